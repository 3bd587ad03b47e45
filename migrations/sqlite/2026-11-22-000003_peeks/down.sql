DROP TABLE received_txns;
DROP TABLE peek_notices;
DROP TABLE destinations;
DROP TABLE inbound_peeks;
