"""Tests of the deployment files: Dockerfile and docker-compose.yml, checked offline."""
