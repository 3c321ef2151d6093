/** A valid profile for the tests, with fields to override. */
import { PROFILE_FORMAT_VERSION, type PrefetchProfile } from '../../../src/profile/profile-format';

const d = (c: string): string => `sha256:${c.repeat(64)}`;

export function sampleProfile(over: Partial<PrefetchProfile> = {}): PrefetchProfile {
  return {
    version: PROFILE_FORMAT_VERSION,
    layer: d('a'),
    tocDigest: d('b'),
    chainId: d('c'),
    layers: [d('a'), d('e')],
    entries: [
      { name: 'usr/bin/python3', offset: 0 },
      { name: 'usr/lib/libc.so.6', offset: 4194304 },
    ],
    ...over,
  };
}
