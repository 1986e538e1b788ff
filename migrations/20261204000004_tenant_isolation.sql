-- Tenant isolation: row-level security for the application role, and the owner-only
-- rule enforced by the database.
--
-- Tenant-scoped queries run as the role outbound_app (SET LOCAL ROLE inside a
-- transaction), with the tenant set per transaction by
-- set_config('app.tenant_id', ..., true) and the acting user by
-- set_config('app.actor_id', ..., true). Policies limit outbound_app to its tenant's
-- rows; the login role's operator and cross-tenant queries (the retry scheduler, the
-- delivery log across tenants) are not limited by them.

DO $$
BEGIN
    BEGIN
        CREATE ROLE outbound_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        -- Another database of this cluster created it first.
        NULL;
    END;
    IF NOT pg_has_role(current_user, 'outbound_app', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT outbound_app TO %I', current_user);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outbound_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, tenant_members, sending_domains, automations,
    suppressions, tenant_restrictions, deliveries TO outbound_app;
GRANT SELECT, INSERT ON audit_log TO outbound_app;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO outbound_app;
GRANT SELECT ON platform_settings TO outbound_app;

-- The tenant of the current transaction, or NULL when none is set.
CREATE FUNCTION app_tenant_id() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('app.tenant_id', true), '')::uuid $$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON tenants
    USING (current_user <> 'outbound_app' OR id = app_tenant_id())
    WITH CHECK (current_user <> 'outbound_app' OR id = app_tenant_id());

DO $$
DECLARE
    scoped text;
BEGIN
    FOREACH scoped IN ARRAY ARRAY['tenant_members', 'sending_domains', 'automations', 'suppressions',
                                  'tenant_restrictions', 'deliveries', 'audit_log']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', scoped);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', scoped);
        EXECUTE format(
            'CREATE POLICY tenant_scope ON %I
                 USING (current_user <> ''outbound_app'' OR tenant_id = app_tenant_id())
                 WITH CHECK (current_user <> ''outbound_app'' OR tenant_id = app_tenant_id())',
            scoped);
    END LOOP;
END
$$;

-- True when the actor is an owner of the tenant. Runs as the function's owner, so that it
-- reads the members whatever the caller's scope.
CREATE FUNCTION is_tenant_owner(tenant uuid, actor uuid) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
    AS $$ SELECT EXISTS (SELECT 1 FROM tenant_members WHERE tenant_id = tenant AND id = actor AND role = 'owner') $$;
REVOKE ALL ON FUNCTION is_tenant_owner(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION is_tenant_owner(uuid, uuid) TO outbound_app;

-- Only the tenant's owner may change its settings, members, domains or automations
-- through the application role. The trigger runs as the caller, so current_user is the
-- role that attempts the change.
CREATE FUNCTION require_tenant_owner() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    row_tenant uuid;
    actor uuid;
BEGIN
    IF current_user <> 'outbound_app' THEN
        RETURN coalesce(NEW, OLD);
    END IF;
    IF TG_TABLE_NAME = 'tenants' THEN
        row_tenant := coalesce(NEW.id, OLD.id);
    ELSE
        row_tenant := coalesce(NEW.tenant_id, OLD.tenant_id);
    END IF;
    actor := nullif(current_setting('app.actor_id', true), '')::uuid;
    IF actor IS NULL OR NOT is_tenant_owner(row_tenant, actor) THEN
        RAISE EXCEPTION 'permission denied: only the tenant owner can change outbound email settings'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN coalesce(NEW, OLD);
END
$$;

CREATE TRIGGER owner_only BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION require_tenant_owner();
CREATE TRIGGER owner_only BEFORE INSERT OR UPDATE OR DELETE ON tenant_members
    FOR EACH ROW EXECUTE FUNCTION require_tenant_owner();
CREATE TRIGGER owner_only BEFORE INSERT OR UPDATE OR DELETE ON sending_domains
    FOR EACH ROW EXECUTE FUNCTION require_tenant_owner();
CREATE TRIGGER owner_only BEFORE INSERT OR UPDATE OR DELETE ON automations
    FOR EACH ROW EXECUTE FUNCTION require_tenant_owner();
