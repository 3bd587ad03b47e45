-- JN-10: the spans of stream positions during which another server has a joined member in a
-- room. The sender sends such a server our own events of the room after `start_stream_pos`
-- and up to `end_stream_pos` (its last member's leave; NULL while it is still joined).
CREATE TABLE joined_servers (
    room_id          TEXT NOT NULL,
    server_name      TEXT NOT NULL,
    start_stream_pos BIGINT NOT NULL,
    end_stream_pos   BIGINT,
    PRIMARY KEY (room_id, server_name, start_stream_pos)
);
CREATE INDEX joined_servers_by_server ON joined_servers (server_name, room_id);
