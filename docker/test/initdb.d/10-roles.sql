-- Roles of the e2e test, created once by the temporary init server. The passwords are
-- placeholders: pg-password-sync replaces them with the mounted secrets on first sync.
-- appdb exists already when POSTGRES_DB names it (docker/compose.yaml does).
CREATE ROLE appuser LOGIN PASSWORD 'placeholder-appuser';
CREATE ROLE backupuser LOGIN PASSWORD 'placeholder-backupuser';
CREATE ROLE temporaluser LOGIN PASSWORD 'placeholder-temporaluser';
CREATE ROLE appowner NOLOGIN;
SELECT 'CREATE DATABASE appdb' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'appdb')
\gexec
ALTER DATABASE appdb OWNER TO appowner;
GRANT CONNECT ON DATABASE appdb TO appuser, backupuser;
