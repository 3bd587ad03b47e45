-- Peeks a room ended (RE-3, RE-4) are few; the eviction job looks for them on every run. This
-- index finds them without scanning every peek (and, right after a sweep of lapsed peeks,
-- every row the sweep just deleted).
CREATE INDEX inbound_peeks_ended ON inbound_peeks (origin) WHERE end_stream_pos IS NOT NULL;
