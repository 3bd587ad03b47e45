DROP TABLE server_key_responses;
DROP TABLE server_keys;
