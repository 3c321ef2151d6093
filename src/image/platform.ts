/**
 * Platforms as `os/arch[/variant]` strings (containerd's notation) and the matching used to pick manifests
 * out of an index.
 */
import { InvalidArgumentError } from '../errors';
import type { Platform } from './media-types';

const NODE_TO_GO_ARCH: Readonly<Record<string, string>> = {
  x64: 'amd64',
  ia32: '386',
  arm64: 'arm64',
  arm: 'arm',
  ppc64: 'ppc64le',
  s390x: 's390x',
  riscv64: 'riscv64',
  loong64: 'loong64',
  mips: 'mips',
  mipsel: 'mipsle',
};

export interface PlatformSpec {
  os: string;
  architecture: string;
  variant: string | undefined;
}

/** The platform this process runs on. */
export function hostPlatform(): PlatformSpec {
  const architecture = NODE_TO_GO_ARCH[process.arch] ?? process.arch;
  const os = process.platform === 'win32' ? 'windows' : process.platform;
  return { os, architecture, variant: architecture === 'arm' ? 'v7' : undefined };
}

/** Parses `os/arch[/variant]`; `arch` alone means linux. */
export function parsePlatform(text: string): PlatformSpec {
  const parts = text.trim().toLowerCase().split('/');
  if (parts.some((p) => p === '') || parts.length > 3) {
    throw new InvalidArgumentError(`invalid platform ${JSON.stringify(text)}: want os/arch[/variant], e.g. linux/amd64`);
  }
  if (parts.length === 1) return normalize({ os: 'linux', architecture: parts[0] as string, variant: undefined });
  return normalize({ os: parts[0] as string, architecture: parts[1] as string, variant: parts[2] });
}

/** containerd's normalisation of common aliases. */
function normalize(p: PlatformSpec): PlatformSpec {
  let { architecture, variant } = p;
  if (architecture === 'x86_64' || architecture === 'x86-64') architecture = 'amd64';
  if (architecture === 'aarch64') architecture = 'arm64';
  if (architecture === 'arm64' && (variant === 'v8' || variant === '8')) variant = undefined;
  if (architecture === 'amd64' && variant === 'v1') variant = undefined;
  return { os: p.os, architecture, variant };
}

export function formatPlatform(p: { os: string; architecture: string; variant?: string | undefined }): string {
  return p.variant !== undefined && p.variant !== '' ? `${p.os}/${p.architecture}/${p.variant}` : `${p.os}/${p.architecture}`;
}

/** Whether an index entry's platform is the wanted one (a wanted variant must match; none wanted takes any). */
export function platformMatches(want: PlatformSpec, have: Platform | undefined): boolean {
  if (have === undefined) return false;
  const h = normalize({ os: have.os.toLowerCase(), architecture: have.architecture.toLowerCase(), variant: have.variant?.toLowerCase() });
  if (h.os !== want.os || h.architecture !== want.architecture) return false;
  return want.variant === undefined || want.variant === h.variant;
}
