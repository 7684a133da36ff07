"""The fusion server: the Flower ServerApp, its strategy and round schedule, the clients'
membership, aggregation of their updates, and the durable bank store."""
