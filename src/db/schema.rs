//! Diesel schema, shared by both backends (only column types common to both are used).

diesel::table! {
    server_keys (server_name, key_id) {
        server_name -> Text,
        key_id -> Text,
        public_key -> Text,
        valid_until_ts -> BigInt,
        is_old -> Bool,
        fetched_ts -> BigInt,
    }
}

diesel::table! {
    server_key_responses (server_name) {
        server_name -> Text,
        response_json -> Text,
        valid_until_ts -> BigInt,
        fetched_ts -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(server_keys, server_key_responses);
