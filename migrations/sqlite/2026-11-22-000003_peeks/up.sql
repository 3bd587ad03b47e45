-- Inbound peeks (MSC2444, we are the target): FP-11.
CREATE TABLE inbound_peeks (
    origin              TEXT   NOT NULL,
    room_id             TEXT   NOT NULL,
    peek_id             TEXT   NOT NULL,
    created_ts          BIGINT NOT NULL,
    renewed_ts          BIGINT NOT NULL,
    renewal_interval_ms BIGINT NOT NULL,
    -- renewed_ts + interval + grace: after this the peek is lapsed (RE-2).
    expires_ts          BIGINT NOT NULL,
    -- Events with a stream position above this reach the peeker (PE-3).
    start_stream_pos    BIGINT NOT NULL,
    -- Set when the peek was ended by the room (RE-3, RE-4): events up to and including this
    -- position are still delivered, nothing after it.
    end_stream_pos      BIGINT,
    -- Why it ended: visibility_changed or room_left (the eviction metric's reason).
    end_reason          TEXT,
    PRIMARY KEY (origin, room_id, peek_id)
);
CREATE INDEX inbound_peeks_expiry ON inbound_peeks (expires_ts);
CREATE INDEX inbound_peeks_room ON inbound_peeks (room_id);

-- Durable delivery, one row per destination (design.md section 4): the events table is the queue.
CREATE TABLE destinations (
    server_name     TEXT    PRIMARY KEY,
    last_sent_pos   BIGINT  NOT NULL,
    failure_count   INTEGER NOT NULL DEFAULT 0,
    retry_at        BIGINT,
    last_success_ts BIGINT,
    -- Which instance's sender owns this destination, until when.
    lease_owner     TEXT,
    lease_expires   BIGINT
);

-- expired_peeks notices waiting for the next transaction to their server (PE-7).
CREATE TABLE peek_notices (
    destination TEXT   NOT NULL,
    room_id     TEXT   NOT NULL,
    peek_id     TEXT   NOT NULL,
    -- Sent only once the destination's cursor has passed this position.
    after_pos   BIGINT NOT NULL,
    PRIMARY KEY (destination, room_id, peek_id)
);

-- Inbound /send de-duplication by (origin, txn_id), with the answer we gave.
CREATE TABLE received_txns (
    origin      TEXT   NOT NULL,
    txn_id      TEXT   NOT NULL,
    response    TEXT   NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
