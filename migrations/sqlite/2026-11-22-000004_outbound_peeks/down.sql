DROP TABLE device_peeks;
DROP TABLE device_peek_log;
DROP TABLE outbound_peeks;
