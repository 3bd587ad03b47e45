DROP TABLE joined_servers;
