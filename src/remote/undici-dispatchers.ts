/**
 * undici's Pool and Agent with its request API, loaded without the rest of undici's index (fetch, WebSocket,
 * EventSource, the HTTP cache, mock agents...), which we do not use: the index costs about 83 ms of CPU to load
 * here, these parts about 32 ms. Every process that talks to a registry pays it at start, and for a
 * `stargaze rpull` it comes before the first request.
 *
 * undici's index.js attaches the request API to Dispatcher.prototype; the same is done here with the same
 * modules (one copy, whichever loads first), so pools and agents behave exactly as those of the index.
 * The paths are undici 7's own layout, not its public API: package.json pins undici to an exact version, and
 * test/unit/remote/undici-dispatchers.test.ts fails, saying what to do, when they move or export other things.
 */
import type * as Undici from 'undici';

const dispatcher = require('undici/lib/dispatcher/dispatcher') as { prototype: object };
const api = require('undici/lib/api') as Record<string, unknown>;
Object.assign(dispatcher.prototype, api);

export const Pool = require('undici/lib/dispatcher/pool') as typeof Undici.Pool;
export type Pool = Undici.Pool;
export const Agent = require('undici/lib/dispatcher/agent') as typeof Undici.Agent;
export type Agent = Undici.Agent;
