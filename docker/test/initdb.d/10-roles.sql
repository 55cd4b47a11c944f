-- Roles of the e2e test, created once by the temporary init server. The passwords are
-- placeholders: pg-password-sync replaces them with the mounted secrets on first sync.
CREATE ROLE appuser LOGIN PASSWORD 'placeholder-appuser';
CREATE ROLE backupuser LOGIN PASSWORD 'placeholder-backupuser';
CREATE ROLE temporaluser LOGIN PASSWORD 'placeholder-temporaluser';
CREATE ROLE appowner NOLOGIN;
CREATE DATABASE appdb OWNER appowner;
GRANT CONNECT ON DATABASE appdb TO appuser, backupuser;
