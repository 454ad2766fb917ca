"""The gateways as a group: who reads which events partition, and following a request another gateway owns."""
