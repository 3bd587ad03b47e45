DROP INDEX inbound_peeks_ended;
