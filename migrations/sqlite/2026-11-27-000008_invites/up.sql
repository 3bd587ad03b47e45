-- JN-5: invites of our users to rooms of other servers that we are not in. The invite event
-- itself is stored as an outlier of the room (for its stream position); this row holds what
-- `/sync` shows in `rooms.invite` (the stripped state the inviting server sent).
CREATE TABLE invites (
    user_id      TEXT   NOT NULL,
    room_id      TEXT   NOT NULL,
    event_id     TEXT   NOT NULL,
    stream_pos   BIGINT NOT NULL,
    invite_state TEXT   NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
