"""Running the stack on one machine: the local broker, the schema registry, child processes, `tokenrelay up`."""
