-- Rooms, events and state. Every event enters through one append path (src/rooms/store.rs),
-- which holds a global lock while it assigns stream positions, so positions commit in order.
CREATE TABLE rooms (
    room_id             TEXT    PRIMARY KEY,
    room_version        TEXT    NOT NULL,
    is_local            BOOLEAN NOT NULL,
    created_ts          BIGINT  NOT NULL,
    -- State after the newest event; NULL until the create event is stored.
    current_state_group BIGINT,
    max_depth           BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE events (
    stream_pos         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id           TEXT    NOT NULL UNIQUE,
    room_id            TEXT    NOT NULL,
    event_type         TEXT    NOT NULL,
    state_key          TEXT,
    sender             TEXT    NOT NULL,
    depth              BIGINT  NOT NULL,
    origin_server_ts   BIGINT  NOT NULL,
    -- The signed federation JSON.
    json               TEXT    NOT NULL,
    -- State before and after this event (state_groups.id).
    state_group_before BIGINT,
    state_group        BIGINT  NOT NULL,
    outlier            BOOLEAN NOT NULL DEFAULT FALSE,
    rejected           BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX events_room_stream ON events (room_id, stream_pos);

-- State at any event without copying the whole state per event: each group stores only what
-- changed since prev_group; a full snapshot (prev_group NULL) every 50 steps bounds the walk.
CREATE TABLE state_groups (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id     TEXT    NOT NULL,
    prev_group  BIGINT,
    delta_depth INTEGER NOT NULL
);
CREATE TABLE state_group_entries (
    group_id   BIGINT NOT NULL,
    event_type TEXT   NOT NULL,
    state_key  TEXT   NOT NULL,
    event_id   TEXT   NOT NULL,
    PRIMARY KEY (group_id, event_type, state_key)
);

-- Current state by key, for the append path and /state without walking groups.
CREATE TABLE current_state (
    room_id    TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);

CREATE TABLE forward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

CREATE TABLE room_aliases (
    alias   TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
);

CREATE TABLE users (
    user_id       TEXT    PRIMARY KEY,
    password_hash TEXT    NOT NULL,
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts    BIGINT  NOT NULL
);

CREATE TABLE devices (
    user_id      TEXT   NOT NULL,
    device_id    TEXT   NOT NULL,
    display_name TEXT,
    last_sync_ts BIGINT,
    created_ts   BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Only a SHA-256 of each token is stored.
CREATE TABLE access_tokens (
    token_hash TEXT   PRIMARY KEY,
    user_id    TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    created_ts BIGINT NOT NULL
);

-- Client transaction ids, so a retried PUT /send returns the same event.
CREATE TABLE client_txns (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);
