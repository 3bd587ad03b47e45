-- Which instance is establishing a room's federation peek (design.md §6, OP-2): instances on
-- one database take turns, so a room never gets two peeks, or two copies of its state, at once.
-- A claim is deleted when its establishment ends; one left by a dead instance expires.
CREATE TABLE outbound_claims (
    room_id    TEXT   PRIMARY KEY,
    owner      TEXT   NOT NULL,
    expires_ts BIGINT NOT NULL
);
