-- Remote servers' verify keys, one row per (server, key id), with the validity we may rely on.
CREATE TABLE server_keys (
    server_name    TEXT   NOT NULL,
    key_id         TEXT   NOT NULL,
    public_key     TEXT   NOT NULL,
    -- min(valid_until_ts, fetch time + 7 days) for current keys; expired_ts for old keys.
    valid_until_ts BIGINT NOT NULL,
    is_old         BOOLEAN NOT NULL DEFAULT FALSE,
    fetched_ts     BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The last verified /_matrix/key/v2/server response per server, served again by the notary API.
CREATE TABLE server_key_responses (
    server_name    TEXT   PRIMARY KEY,
    response_json  TEXT   NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    fetched_ts     BIGINT NOT NULL
);
