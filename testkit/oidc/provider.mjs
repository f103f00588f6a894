// A real OpenID provider for chatvault's tests: node-oidc-provider (OpenID-certified), configured from a JSON
// file. It issues RFC 9068 JWT access tokens for the API `audience` through the client-credentials grant,
// with each client's `groups` as a claim, and serves discovery and JWKS like any production provider.
// Optionally it also signs people in through public clients with the device authorization grant (RFC 8628):
// its development login form takes any login name, and the access tokens then carry that account's groups.
//
//   node provider.mjs serve <config.json>   -> prints "listening <issuer>" once it accepts connections
//   node provider.mjs genkey <kid>          -> prints {"jwk": <private RSA JWK>, "pkcs8": <base64 DER>}
//
// config.json: {"issuer": "http://127.0.0.1:<port>", "port": <port>, "audience": "<api>",
//               "keys": [<private JWK>, ...], "clients": [{"client_id", "client_secret", "groups"}],
//               optional, for the device grant:
//               "device_clients": [{"client_id"}],            public clients (no secret)
//               "accounts": {"<login>": ["<group>", ...]},    the groups of whoever signs in as <login>
//               "device_interval": <seconds>,                 the polling interval the device is told
//               "access_token_ttl": <seconds>}                access-token lifetime (default 1 h, or 10 min
//                                                             for client credentials)
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const [mode, argument] = process.argv.slice(2);

if (mode === 'genkey') {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: argument, alg: 'RS256', use: 'sig' };
  const pkcs8 = privateKey.export({ format: 'der', type: 'pkcs8' }).toString('base64');
  process.stdout.write(JSON.stringify({ jwk, pkcs8 }) + '\n');
} else if (mode === 'serve') {
  const config = JSON.parse(readFileSync(argument, 'utf8'));
  const groups = new Map(config.clients.map((client) => [client.client_id, client.groups ?? []]));
  const accounts = new Map(Object.entries(config.accounts ?? {}));
  const deviceClients = config.device_clients ?? [];
  const resourceServer = { scope: 'chatvault', accessTokenFormat: 'jwt', audience: config.audience };
  if (config.access_token_ttl !== undefined) {
    resourceServer.accessTokenTTL = config.access_token_ttl;
  }
  const provider = new Provider(config.issuer, {
    jwks: { keys: config.keys },
    clients: [
      ...config.clients.map(({ client_id, client_secret }) => ({
        client_id,
        client_secret,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
      })),
      // A command-line client: public (it cannot keep a secret), the device grant and refresh tokens only.
      // The provider's default issueRefreshToken gives it refresh tokens when `offline_access` is asked for.
      ...deviceClients.map(({ client_id }) => ({
        client_id,
        token_endpoint_auth_method: 'none',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        redirect_uris: [],
        response_types: [],
      })),
    ],
    features: {
      clientCredentials: { enabled: true },
      deviceFlow: { enabled: deviceClients.length > 0 },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => config.audience,
        // With `openid` among the scopes the provider would otherwise issue an opaque token for its own
        // userinfo endpoint unless the token request names the resource again; the API is what a device
        // sign-in is for, so its tokens are for the resource granted at the device authorization request
        // (requested, or the default above). No effect on client credentials.
        useGrantedResource: () => true,
        getResourceServerInfo: () => resourceServer,
      },
    },
    // A person's token (device grant, refreshed) carries the groups of the account they signed in as; a
    // client-credentials token those of its client.
    extraTokenClaims: (ctx, token) => ({
      groups: token.accountId !== undefined
        ? accounts.get(token.accountId) ?? []
        : groups.get(token.clientId) ?? [],
    }),
  });
  // node-oidc-provider leaves `interval` out of device authorization responses, which tells a device to poll
  // every 5 s (RFC 8628 section 3.2); tests may ask for a shorter interval here.
  if (config.device_interval !== undefined) {
    provider.use(async (ctx, next) => {
      await next();
      if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body?.device_code) {
        ctx.body = { ...ctx.body, interval: config.device_interval };
      }
    });
  }
  provider.listen(config.port, '127.0.0.1', () => {
    process.stdout.write(`listening ${config.issuer}\n`);
  });
} else {
  process.stderr.write('usage: provider.mjs serve <config.json> | genkey <kid>\n');
  process.exit(2);
}
