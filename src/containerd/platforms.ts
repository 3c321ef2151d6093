/**
 * Platform strings (`os/arch[/variant]`) and picking the manifest for one out of an index, after containerd's
 * platforms package: names are normalised (x86_64 -> amd64, aarch64 -> arm64, arm64/v8 -> arm64, arm -> arm/v7)
 * and a wanted platform also accepts older variants of the same architecture, best first (as platforms.Only
 * does for arm/v7 -> v6 -> v5; its arm64 -> arm/v8 fallback is left out: a pull wants the native image).
 */
import { InvalidArgumentError } from '../errors';

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

/** Node's process.arch -> GOARCH. */
const NODE_TO_GOARCH: Readonly<Record<string, string>> = {
  x64: 'amd64',
  arm64: 'arm64',
  arm: 'arm',
  ia32: '386',
  ppc64: 'ppc64le',
  s390x: 's390x',
  riscv64: 'riscv64',
  mips64el: 'mips64le',
  loong64: 'loong64',
};

function normalizeOs(os: string): string {
  const o = os.toLowerCase();
  return o === 'macos' ? 'darwin' : o;
}

/** containerd's normalizeArch. */
function normalizeArch(arch: string, variant: string): { architecture: string; variant: string } {
  let a = arch.toLowerCase();
  let v = variant.toLowerCase();
  switch (a) {
    case 'i386':
      a = '386';
      v = '';
      break;
    case 'x86_64':
    case 'x86-64':
    case 'amd64':
      a = 'amd64';
      if (v === 'v1') v = '';
      break;
    case 'aarch64':
    case 'arm64':
      a = 'arm64';
      if (v === '8' || v === 'v8') v = '';
      break;
    case 'armhf':
      a = 'arm';
      v = 'v7';
      break;
    case 'armel':
      a = 'arm';
      v = 'v6';
      break;
    case 'arm':
      if (v === '' || v === '7') v = 'v7';
      else if (v === '5' || v === '6' || v === '8') v = `v${v}`;
      break;
    default:
      break;
  }
  return { architecture: a, variant: v };
}

export function normalizePlatform(p: Platform): Platform {
  const { architecture, variant } = normalizeArch(p.architecture, p.variant ?? '');
  return { os: normalizeOs(p.os), architecture, ...(variant !== '' ? { variant } : {}) };
}

export function formatPlatform(p: Platform): string {
  return [p.os, p.architecture, ...(p.variant ? [p.variant] : [])].join('/');
}

/** Parses `os/arch[/variant]` (or just `arch`, meaning linux/arch). */
export function parsePlatform(spec: string): Platform {
  const parts = spec.trim().split('/');
  if (parts.some((s) => !/^[A-Za-z0-9_-]+$/.test(s)) || parts.length > 3) {
    throw new InvalidArgumentError(`invalid platform "${spec}": want os/arch[/variant], e.g. linux/amd64 or linux/arm/v7`);
  }
  if (parts.length === 1) return normalizePlatform({ os: 'linux', architecture: parts[0] as string });
  return normalizePlatform({ os: parts[0] as string, architecture: parts[1] as string, variant: parts[2] });
}

/** The platform this process runs on: linux/<arch>[/<variant>]. */
export function hostPlatform(): Platform {
  const architecture = NODE_TO_GOARCH[process.arch] ?? process.arch;
  let variant: string | undefined;
  if (architecture === 'arm') {
    const v = (process.config.variables as unknown as Record<string, unknown>).arm_version;
    variant = typeof v === 'number' || typeof v === 'string' ? `v${v}` : undefined;
  }
  return normalizePlatform({ os: process.platform === 'linux' ? 'linux' : process.platform, architecture, variant });
}

/**
 * How well `candidate` serves `wanted`: 0 is an exact match, higher is worse, undefined is no match
 * (the ordering of containerd's platforms.Only matcher).
 */
export function platformRank(wanted: Platform, candidate: Platform): number | undefined {
  const w = normalizePlatform(wanted);
  const c = normalizePlatform(candidate);
  if (w.os !== c.os || w.architecture !== c.architecture) return undefined;
  const wv = w.variant ?? '';
  const cv = c.variant ?? '';
  if (wv === cv) return 0;
  // arm/vN runs arm/vM for M < N; amd64/vN runs amd64/vM for M < N.
  const m = /^v(\d+)$/.exec(wv);
  const n = /^v(\d+)$/.exec(cv);
  if ((c.architecture === 'arm' || c.architecture === 'amd64') && m && (n || cv === '')) {
    const want = Number(m[1]);
    const got = n ? Number(n[1]) : c.architecture === 'amd64' ? 1 : 0;
    if (got < want) return want - got;
  }
  return undefined;
}
