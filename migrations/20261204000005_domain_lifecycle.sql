-- Domain lifecycle: DNS verification, revalidation, DKIM key rotation and dual signing.
--
-- A domain's keys move out of sending_domains into dkim_keys, so that a domain can hold
-- a pending key (made by rotate-key or by turning on Ed25519, waiting for its record),
-- the active keys that sign (at most one per algorithm), and retired keys whose records
-- the owner may delete once the overlap has passed.

CREATE TABLE dkim_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    domain       text NOT NULL REFERENCES sending_domains (domain) ON DELETE CASCADE,
    selector     text NOT NULL,
    algorithm    text NOT NULL CHECK (algorithm IN ('rsa', 'ed25519')),
    -- AES-256-GCM under OUTBOUND_KEY_ENCRYPTION_KEY with the domain as associated data:
    -- 12-byte nonce, ciphertext, tag. PKCS#8 DER inside.
    private_key  bytea NOT NULL,
    -- The p= value of the DKIM record: base64 SubjectPublicKeyInfo for RSA, base64 of the
    -- raw 32-byte key for Ed25519 (RFC 8463).
    public_key   text NOT NULL,
    state        text NOT NULL CHECK (state IN ('pending', 'active', 'retired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    retired_at   timestamptz,
    UNIQUE (domain, selector)
);
CREATE UNIQUE INDEX dkim_keys_one_active ON dkim_keys (domain, algorithm) WHERE state = 'active';
CREATE UNIQUE INDEX dkim_keys_one_pending ON dkim_keys (domain, algorithm) WHERE state = 'pending';
CREATE INDEX dkim_keys_tenant ON dkim_keys (tenant_id);

INSERT INTO dkim_keys (id, tenant_id, domain, selector, algorithm, private_key, public_key, state, created_at, activated_at)
SELECT gen_random_uuid(), tenant_id, domain, selector, 'rsa', dkim_private_key, dkim_public_key, 'active', created_at, created_at
FROM sending_domains;

ALTER TABLE sending_domains
    DROP COLUMN selector,
    DROP COLUMN dkim_private_key,
    DROP COLUMN dkim_public_key,
    -- When revalidation last looked the records up, and when they started failing.
    ADD COLUMN checked_at    timestamptz,
    ADD COLUMN failing_since timestamptz,
    -- The last check, record by record, as `domain verify --json` prints it.
    ADD COLUMN last_check    jsonb;

CREATE INDEX sending_domains_due ON sending_domains (checked_at) WHERE status IN ('verified', 'failing');

GRANT SELECT, INSERT, UPDATE, DELETE ON dkim_keys TO outbound_app;
ALTER TABLE dkim_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE dkim_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON dkim_keys
    USING (current_user <> 'outbound_app' OR tenant_id = app_tenant_id())
    WITH CHECK (current_user <> 'outbound_app' OR tenant_id = app_tenant_id());
CREATE TRIGGER owner_only BEFORE INSERT OR UPDATE OR DELETE ON dkim_keys
    FOR EACH ROW EXECUTE FUNCTION require_tenant_owner();
