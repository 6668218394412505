// The test suite's OpenID provider: node-oidc-provider configured for client_credentials with
// private_key_jwt (and a legacy client_secret client), DPoP, and JWT access tokens per resource.
// Started by tests/counterparts.py with a JSON config file; test-only endpoints under /__test/.
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import { createLocalJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';
import { handler as clientCredentials } from 'oidc-provider/lib/actions/grants/client_credentials.js';
import * as grantHelpers from 'oidc-provider/lib/helpers/grants.js';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const stats = { token_requests: 0, token_issued: 0, dpop_bound: 0, token_exchanges: 0 };
let requireNonce = Boolean(cfg.require_nonce);
const record = (entry) => fs.appendFileSync(cfg.record_file, `${JSON.stringify(entry)}\n`);

const provider = new Provider(cfg.issuer, {
  clients: cfg.clients,
  clientAuthMethods: [
    'client_secret_basic', 'private_key_jwt', ...(cfg.spiffe ? ['client_secret_post'] : []),
    ...(cfg.tls ? ['tls_client_auth'] : []),
  ],
  jwks: { keys: [cfg.signing_jwk] },
  scopes: ['openid', ...cfg.scopes],
  features: {
    devInteractions: { enabled: false },
    // RFC 8705, when served over TLS: tls_client_auth by subject DN, certificate-bound tokens
    mTLS: {
      enabled: Boolean(cfg.tls),
      tlsClientAuth: true,
      certificateBoundAccessTokens: true,
      getCertificate: (ctx) => {
        const peer = ctx.socket.getPeerCertificate?.();
        return peer?.raw ? new X509Certificate(peer.raw) : undefined;
      },
      certificateAuthorized: (ctx) => ctx.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => {
        const cert = new X509Certificate(ctx.socket.getPeerCertificate().raw);
        if (property === 'tls_client_auth_subject_dn') return cert.subject === expected;
        // an X.509-SVID: the SPIFFE ID is the certificate's URI SAN
        if (property === 'tls_client_auth_san_uri') {
          return (cert.subjectAltName ?? '').split(', ').includes(`URI:${expected}`);
        }
        return false;
      },
    },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: Buffer.from(cfg.nonce_secret_hex, 'hex'),
      requireNonce: () => requireNonce,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        const rs = cfg.resources[indicator];
        if (!rs) throw new errors.InvalidTarget();
        return {
          scope: rs.scope,
          audience: indicator,
          accessTokenTTL: rs.ttl_s,
          accessTokenFormat: rs.format ?? 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  enabledJWA: {
    clientAuthSigningAlgValues: ['ES256', 'EdDSA', 'RS256'],
    dPoPSigningAlgValues: ['ES256', 'EdDSA'],
  },
});

// RFC 8693 token exchange: the subject token (a Kubernetes-style projected JWT) must be signed
// by the cluster key the test registers; the access token is then issued like client_credentials
// (so resource indicators, DPoP binding and JWT format apply unchanged).
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const subjectKeys = createLocalJWKSet({ keys: cfg.subject_jwks ?? [] });
const helpers = Object.fromEntries(
  Object.entries(grantHelpers).map(([name, helper]) => [name, helper.bind(undefined, provider)]),
);
provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { subject_token: subjectToken, subject_token_type: subjectType } = ctx.oidc.params;
  if (subjectType !== 'urn:ietf:params:oauth:token-type:jwt') {
    throw new errors.InvalidRequest('subject_token_type must be urn:ietf:params:oauth:token-type:jwt');
  }
  try {
    await jwtVerify(subjectToken, subjectKeys, { issuer: cfg.subject_issuer, audience: cfg.issuer });
  } catch (err) {
    throw new errors.InvalidGrant(`subject_token rejected: ${err.code ?? err.message}`);
  }
  stats.token_exchanges += 1;
  await clientCredentials(provider, helpers, ctx);
}, ['subject_token', 'subject_token_type', 'requested_token_type', 'scope', 'resource'], ['resource']);

provider.use(async (ctx, next) => {
  if (ctx.path === '/__test/stats') {
    ctx.body = { ...stats, require_nonce: requireNonce };
    return;
  }
  if (ctx.path === '/__test/require-nonce' && ctx.method === 'POST') {
    requireNonce = ctx.query.on === '1';
    ctx.body = { require_nonce: requireNonce };
    return;
  }
  const isToken = ctx.path === '/token' && ctx.method === 'POST';
  if (isToken) stats.token_requests += 1;
  await next();
  if (ctx.path === '/token/revocation') {
    record({ revocation: ctx.status, token: ctx.oidc?.params?.token, error: ctx.body?.error });
    return;
  }
  if (!isToken) return;
  const params = ctx.oidc?.params ?? {};
  const issued = ctx.status === 200 && ctx.body?.access_token;
  if (issued) {
    stats.token_issued += 1;
    if (ctx.body.token_type === 'DPoP') stats.dpop_bound += 1;
  }
  record({
    status: ctx.status,
    error: ctx.body?.error,
    client_assertion: params.client_assertion,
    subject_token: params.subject_token,
    dpop: ctx.get('dpop') || undefined,
    access_token: issued ? ctx.body.access_token : undefined,
  });
});

// Client authentication with a JWT-SVID: as an RFC 7523 client assertion (jwt-bearer) or as the
// OAuth SPIFFE client authentication draft's jwt-spiffe. The JWT-SVID is verified against the
// JWT authorities of SPIRE's published bundle (cfg.spiffe.jwks), for this issuer as audience and
// the client's registered SPIFFE ID as subject; the request then goes on as that client.
// oidc-provider has no hook for a new client authentication method, so a verified request is
// handed on with the client's internal secret (client_secret_post), never seen by credproxy.
const ASSERTION_TYPES = {
  'urn:ietf:params:oauth:client-assertion-type:jwt-bearer': 'jwt-bearer',
  'urn:ietf:params:oauth:client-assertion-type:jwt-spiffe': 'jwt-spiffe',
};
const spiffeKeys = cfg.spiffe ? createLocalJWKSet({ keys: cfg.spiffe.jwks }) : undefined;
stats.spiffe_client_auth = { 'jwt-bearer': 0, 'jwt-spiffe': 0, rejected: 0 };
provider.use(async (ctx, next) => {
  const form = ctx.method === 'POST' && ctx.is('application/x-www-form-urlencoded');
  if (!spiffeKeys || !form || !['/token', '/token/revocation'].includes(ctx.path)) {
    await next();
    return;
  }
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  const params = new URLSearchParams(Buffer.concat(chunks).toString());
  const client = cfg.spiffe.clients.find((c) => c.client_id === params.get('client_id'));
  const kind = ASSERTION_TYPES[params.get('client_assertion_type')];
  if (client && kind) {
    const assertion = params.get('client_assertion') ?? '';
    record({ spiffe_client_auth: kind, client_assertion: assertion });
    try {
      await jwtVerify(assertion, spiffeKeys, { audience: cfg.issuer, subject: client.spiffe_id });
    } catch (err) {
      stats.spiffe_client_auth.rejected += 1;
      ctx.status = 401;
      ctx.body = { error: 'invalid_client', error_description: `JWT-SVID rejected: ${err.code ?? err.message}` };
      return;
    }
    stats.spiffe_client_auth[kind] += 1;
    params.delete('client_assertion');
    params.delete('client_assertion_type');
    params.set('client_secret', client.secret);
  }
  ctx.req.body = params.toString();  // oidc-provider reads an already-read body from here
  await next();
});

const listening = () => console.log(`oidc-provider listening on ${cfg.issuer}`);
if (cfg.tls) {
  // Client certificates are asked for, never required: discovery and introspection go without.
  const tls = {
    cert: fs.readFileSync(cfg.tls.cert),
    key: fs.readFileSync(cfg.tls.key),
    ca: fs.readFileSync(cfg.tls.ca),
    requestCert: true,
    rejectUnauthorized: false,
  };
  https.createServer(tls, provider.callback()).listen(cfg.port, '127.0.0.1', listening);
} else {
  provider.listen(cfg.port, '127.0.0.1', listening);
}
