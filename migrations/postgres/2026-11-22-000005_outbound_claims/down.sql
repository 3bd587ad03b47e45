DROP TABLE outbound_claims;
