-- Governance: the platform kill switch, automations, suppressions and restrictions.

-- A single row: the global switch for automated sending.
CREATE TABLE platform_settings (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    kill_switch        boolean NOT NULL DEFAULT false,
    kill_switch_reason text,
    changed_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO platform_settings (id) VALUES (true);

CREATE TABLE automations (
    id                          uuid PRIMARY KEY,
    tenant_id                   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                        text NOT NULL CHECK (name <> ''),
    mode                        text NOT NULL DEFAULT 'shadow' CHECK (mode IN ('shadow', 'live')),
    shadow_validated            boolean NOT NULL DEFAULT false,
    readiness_score             double precision NOT NULL DEFAULT 0 CHECK (readiness_score BETWEEN 0 AND 1),
    readiness_threshold         double precision NOT NULL DEFAULT 0.8 CHECK (readiness_threshold BETWEEN 0 AND 1),
    revalidated_at              timestamptz,
    revalidation_interval_days  integer NOT NULL DEFAULT 30 CHECK (revalidation_interval_days > 0),
    created_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX automations_tenant ON automations (tenant_id);

-- Recipients a tenant must not mail; addresses are stored as the worker compares them
-- (domain in lower-case ASCII).
CREATE TABLE suppressions (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    address    text NOT NULL,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, address)
);

-- Written by abnormal-pattern detectors; in force until expires_at or an operator clears it.
CREATE TABLE tenant_restrictions (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    detector   text NOT NULL,
    scope      text NOT NULL CHECK (scope IN ('automation', 'all')),
    evidence   jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    cleared_at timestamptz
);
CREATE INDEX tenant_restrictions_active ON tenant_restrictions (tenant_id) WHERE cleared_at IS NULL;

-- Automated messages per recipient and conversation, for reply-loop protection.
CREATE INDEX deliveries_automation_loop ON deliveries (tenant_id, conversation_id, created_at) WHERE origin = 'automation';
