-- Tenants, their members and sending domains, the delivery log and the audit log.

CREATE TABLE tenants (
    id               uuid PRIMARY KEY,
    name             text NOT NULL CHECK (name <> ''),
    plan             text NOT NULL DEFAULT 'starter' CHECK (plan IN ('starter', 'growth', 'enterprise')),
    outbound_enabled boolean NOT NULL DEFAULT true,
    automation_paused boolean NOT NULL DEFAULT false,
    rate_per_minute  integer CHECK (rate_per_minute > 0),
    burst            integer CHECK (burst > 0),
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenant_members (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email      text NOT NULL,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'agent')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tenant_members_email ON tenant_members (tenant_id, lower(email));

CREATE TABLE sending_domains (
    id                 uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Lower-case ASCII (IDNA) form; one domain belongs to one tenant.
    domain             text NOT NULL UNIQUE,
    selector           text NOT NULL,
    -- AES-256-GCM under OUTBOUND_KEY_ENCRYPTION_KEY: 12-byte nonce, ciphertext, tag.
    dkim_private_key   bytea NOT NULL,
    -- Base64 SubjectPublicKeyInfo, as published in the DKIM record's p= tag.
    dkim_public_key    text NOT NULL,
    verification_token text NOT NULL,
    status             text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'verified', 'failing', 'suspended')),
    verified_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sending_domains_tenant ON sending_domains (tenant_id);

CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    tenant_id  uuid REFERENCES tenants (id) ON DELETE SET NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    subject    text,
    old_value  jsonb,
    new_value  jsonb,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, created_at);

-- One row per request_id: the idempotency record, the retry queue and the delivery log.
-- status 'processing' means a worker owns the row until lease_until.
CREATE TABLE deliveries (
    request_id          uuid PRIMARY KEY,
    tenant_id           uuid,
    conversation_id     text,
    origin              text CHECK (origin IN ('agent', 'automation')),
    from_address        text,
    recipients          text[] NOT NULL DEFAULT '{}',
    subject             text,
    message_id          text,
    references_ids      text[] NOT NULL DEFAULT '{}',
    status              text NOT NULL CHECK (status IN ('processing', 'deferred', 'sent', 'failed', 'blocked', 'shadowed', 'invalid')),
    reason              text,
    detail              text,
    attempt             integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz,
    lease_until         timestamptz,
    request             jsonb,
    signed_message      bytea,
    recipient_results   jsonb NOT NULL DEFAULT '[]',
    last_result         jsonb,
    result_published_at timestamptz,
    published_at        timestamptz,
    first_attempt_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
CREATE INDEX deliveries_tenant_time ON deliveries (tenant_id, created_at);
CREATE INDEX deliveries_conversation ON deliveries (tenant_id, conversation_id, created_at);
CREATE INDEX deliveries_recipients ON deliveries USING gin (recipients);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status IN ('deferred', 'processing');
CREATE INDEX deliveries_unpublished ON deliveries (updated_at) WHERE result_published_at IS NULL;
