"""Load tests for the gateway: a locustfile with a step load shape, and a runner that summarises the run."""
