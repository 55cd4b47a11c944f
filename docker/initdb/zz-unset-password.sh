# shellcheck shell=bash
# Sourced (not executed: no exec bit) by the official docker-entrypoint.sh as the last of
# the init scripts, in the entrypoint's own shell. The entrypoint exported the superuser's
# plaintext as POSTGRES_PASSWORD (from POSTGRES_PASSWORD_FILE) to initialise the cluster;
# without this, its final `exec postgres` would leave it in the environment of the
# postmaster and every backend. On later starts pg-password-sync run does not pass the
# variables on at all.
unset POSTGRES_PASSWORD
