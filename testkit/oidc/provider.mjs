// A real OpenID provider for chatvault's tests: node-oidc-provider (OpenID-certified), configured from a JSON
// file. It issues RFC 9068 JWT access tokens for the API `audience` through the client-credentials grant,
// with each client's `groups` as a claim, and serves discovery and JWKS like any production provider.
//
//   node provider.mjs serve <config.json>   -> prints "listening <issuer>" once it accepts connections
//   node provider.mjs genkey <kid>          -> prints {"jwk": <private RSA JWK>, "pkcs8": <base64 DER>}
//
// config.json: {"issuer": "http://127.0.0.1:<port>", "port": <port>, "audience": "<api>",
//               "keys": [<private JWK>, ...], "clients": [{"client_id", "client_secret", "groups"}]}
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
  const provider = new Provider(config.issuer, {
    jwks: { keys: config.keys },
    clients: config.clients.map(({ client_id, client_secret }) => ({
      client_id,
      client_secret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    })),
    features: {
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => config.audience,
        getResourceServerInfo: () => ({ scope: 'chatvault', accessTokenFormat: 'jwt', audience: config.audience }),
      },
    },
    extraTokenClaims: (ctx, token) => ({ groups: groups.get(token.clientId) ?? [] }),
  });
  provider.listen(config.port, '127.0.0.1', () => {
    process.stdout.write(`listening ${config.issuer}\n`);
  });
} else {
  process.stderr.write('usage: provider.mjs serve <config.json> | genkey <kid>\n');
  process.exit(2);
}
