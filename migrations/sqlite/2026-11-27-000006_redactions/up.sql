-- H19: every stored m.room.redaction by the event it names, so that an event arriving after
-- its redaction (a backfilled or forked event) is redacted as it is stored.
CREATE TABLE redactions (
    redacts  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    room_id  TEXT NOT NULL,
    PRIMARY KEY (redacts, event_id)
);
