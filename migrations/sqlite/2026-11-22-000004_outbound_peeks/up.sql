-- Outbound peeks (MSC2444, we are the peeker): at most one federation peek per room, shared by
-- every local device that peeks it (OP-2).
CREATE TABLE outbound_peeks (
    room_id             TEXT   PRIMARY KEY,
    target              TEXT   NOT NULL,
    peek_id             TEXT   NOT NULL,
    -- Ordered candidate servers (JSON array) for failover (OP-1, OP-5, OP-6).
    candidates          TEXT   NOT NULL,
    created_ts          BIGINT NOT NULL,
    renewed_ts          BIGINT NOT NULL,
    -- As the target advertised it; scheduling clamps it (OP-7).
    renewal_interval_ms BIGINT NOT NULL,
    next_renewal_ts     BIGINT NOT NULL,
    -- Consecutive failed renewals (network or 5xx), for back-off until the peek lapses.
    failures            INTEGER NOT NULL DEFAULT 0,
    -- Set when we sent DELETE: PDUs from the target are still accepted for a minute (OP-9).
    ended_ts            BIGINT
);
CREATE INDEX outbound_peeks_next ON outbound_peeks (next_renewal_ts);

-- One row per peek start or end of a local device: the ids order these changes for /sync
-- tokens, which events' stream positions cannot do (an unpeek writes no event).
CREATE TABLE device_peek_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    room_id    TEXT   NOT NULL,
    change     TEXT   NOT NULL,
    ts         BIGINT NOT NULL
);

-- Local devices' peeks (MSC2753, CP-5).
CREATE TABLE device_peeks (
    user_id     TEXT    NOT NULL,
    device_id   TEXT    NOT NULL,
    room_id     TEXT    NOT NULL,
    created_ts  BIGINT  NOT NULL,
    -- device_peek_log ids of the start and (once ended) the end of this peek.
    start_seq   BIGINT  NOT NULL,
    end_seq     BIGINT,
    -- The event stream position when the peek ended (the leave entry's timeline stops there).
    end_pos     BIGINT,
    -- unpeek, initial_sync, joined, visibility_changed, logout.
    end_reason  TEXT,
    -- The room's timeline has a gap for this device (re-established after idling): the next
    -- sync marks it limited (TBD-1).
    gappy       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, room_id)
);
CREATE INDEX device_peeks_room ON device_peeks (room_id);
