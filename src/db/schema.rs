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

diesel::table! {
    rooms (room_id) {
        room_id -> Text,
        room_version -> Text,
        is_local -> Bool,
        created_ts -> BigInt,
        current_state_group -> Nullable<BigInt>,
        max_depth -> BigInt,
    }
}

diesel::table! {
    events (stream_pos) {
        stream_pos -> BigInt,
        event_id -> Text,
        room_id -> Text,
        event_type -> Text,
        state_key -> Nullable<Text>,
        sender -> Text,
        depth -> BigInt,
        origin_server_ts -> BigInt,
        json -> Text,
        state_group_before -> Nullable<BigInt>,
        state_group -> BigInt,
        outlier -> Bool,
        rejected -> Bool,
    }
}

diesel::table! {
    state_groups (id) {
        id -> BigInt,
        room_id -> Text,
        prev_group -> Nullable<BigInt>,
        delta_depth -> Integer,
    }
}

diesel::table! {
    state_group_entries (group_id, event_type, state_key) {
        group_id -> BigInt,
        event_type -> Text,
        state_key -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    current_state (room_id, event_type, state_key) {
        room_id -> Text,
        event_type -> Text,
        state_key -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    forward_extremities (room_id, event_id) {
        room_id -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    room_aliases (alias) {
        alias -> Text,
        room_id -> Text,
        creator -> Text,
    }
}

diesel::table! {
    users (user_id) {
        user_id -> Text,
        password_hash -> Text,
        is_admin -> Bool,
        created_ts -> BigInt,
    }
}

diesel::table! {
    devices (user_id, device_id) {
        user_id -> Text,
        device_id -> Text,
        display_name -> Nullable<Text>,
        last_sync_ts -> Nullable<BigInt>,
        created_ts -> BigInt,
    }
}

diesel::table! {
    access_tokens (token_hash) {
        token_hash -> Text,
        user_id -> Text,
        device_id -> Text,
        created_ts -> BigInt,
    }
}

diesel::table! {
    client_txns (user_id, device_id, txn_id) {
        user_id -> Text,
        device_id -> Text,
        txn_id -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    inbound_peeks (origin, room_id, peek_id) {
        origin -> Text,
        room_id -> Text,
        peek_id -> Text,
        created_ts -> BigInt,
        renewed_ts -> BigInt,
        renewal_interval_ms -> BigInt,
        expires_ts -> BigInt,
        start_stream_pos -> BigInt,
        end_stream_pos -> Nullable<BigInt>,
        end_reason -> Nullable<Text>,
    }
}

diesel::table! {
    destinations (server_name) {
        server_name -> Text,
        last_sent_pos -> BigInt,
        failure_count -> Integer,
        retry_at -> Nullable<BigInt>,
        last_success_ts -> Nullable<BigInt>,
        lease_owner -> Nullable<Text>,
        lease_expires -> Nullable<BigInt>,
    }
}

diesel::table! {
    peek_notices (destination, room_id, peek_id) {
        destination -> Text,
        room_id -> Text,
        peek_id -> Text,
        after_pos -> BigInt,
    }
}

diesel::table! {
    received_txns (origin, txn_id) {
        origin -> Text,
        txn_id -> Text,
        response -> Text,
        received_ts -> BigInt,
    }
}

diesel::table! {
    outbound_peeks (room_id) {
        room_id -> Text,
        target -> Text,
        peek_id -> Text,
        candidates -> Text,
        created_ts -> BigInt,
        renewed_ts -> BigInt,
        renewal_interval_ms -> BigInt,
        next_renewal_ts -> BigInt,
        failures -> Integer,
        ended_ts -> Nullable<BigInt>,
    }
}

diesel::table! {
    invites (user_id, room_id) {
        user_id -> Text,
        room_id -> Text,
        event_id -> Text,
        stream_pos -> BigInt,
        invite_state -> Text,
    }
}

diesel::table! {
    joined_servers (room_id, server_name, start_stream_pos) {
        room_id -> Text,
        server_name -> Text,
        start_stream_pos -> BigInt,
        end_stream_pos -> Nullable<BigInt>,
    }
}

diesel::table! {
    redactions (redacts, event_id) {
        redacts -> Text,
        event_id -> Text,
        room_id -> Text,
    }
}

diesel::table! {
    outbound_claims (room_id) {
        room_id -> Text,
        owner -> Text,
        expires_ts -> BigInt,
    }
}

diesel::table! {
    device_peek_log (id) {
        id -> BigInt,
        user_id -> Text,
        device_id -> Text,
        room_id -> Text,
        change -> Text,
        ts -> BigInt,
    }
}

diesel::table! {
    device_peeks (user_id, device_id, room_id) {
        user_id -> Text,
        device_id -> Text,
        room_id -> Text,
        created_ts -> BigInt,
        start_seq -> BigInt,
        end_seq -> Nullable<BigInt>,
        end_pos -> Nullable<BigInt>,
        end_reason -> Nullable<Text>,
        gappy -> Bool,
    }
}

diesel::joinable!(events -> rooms (room_id));

diesel::allow_tables_to_appear_in_same_query!(
    server_keys,
    invites,
    joined_servers,
    redactions,
    outbound_claims,
    server_key_responses,
    rooms,
    events,
    state_groups,
    state_group_entries,
    current_state,
    forward_extremities,
    room_aliases,
    users,
    devices,
    access_tokens,
    client_txns,
    inbound_peeks,
    destinations,
    peek_notices,
    received_txns,
    outbound_peeks,
    device_peek_log,
    device_peeks,
);
