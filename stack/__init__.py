"""Local servers as child processes (redis-server, tritonserver, the gateway, prometheus) and the `onerec up` stack."""
