/**
 * Types for the parts of fuse-native (which ships none) that stargaze uses.
 * Callbacks take a negative errno or 0 first, as libfuse does.
 */
declare module 'fuse-native' {
  export interface FuseStat {
    mode: number;
    uid: number;
    gid: number;
    size: number;
    dev?: number;
    nlink: number;
    ino: number;
    rdev: number;
    blksize: number;
    blocks: number;
    atime: Date | number;
    mtime: Date | number;
    ctime: Date | number;
  }

  export interface FuseStatfs {
    bsize: number;
    frsize: number;
    blocks: number;
    bfree: number;
    bavail: number;
    files: number;
    ffree: number;
    favail: number;
    fsid: number;
    flag: number;
    namemax: number;
  }

  export interface FuseOps {
    init?(cb: (err: number) => void): void;
    statfs?(path: string, cb: (err: number, stat?: FuseStatfs) => void): void;
    getattr?(path: string, cb: (err: number, stat?: FuseStat) => void): void;
    fgetattr?(path: string, fd: number, cb: (err: number, stat?: FuseStat) => void): void;
    access?(path: string, mode: number, cb: (err: number) => void): void;
    open?(path: string, flags: number, cb: (err: number, fd?: number) => void): void;
    opendir?(path: string, flags: number, cb: (err: number, fd?: number) => void): void;
    release?(path: string, fd: number, cb: (err: number) => void): void;
    releasedir?(path: string, fd: number, cb: (err: number) => void): void;
    read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesReadOrErr: number) => void): void;
    readdir?(path: string, cb: (err: number, names?: string[], stats?: FuseStat[]) => void): void;
    readlink?(path: string, cb: (err: number, target?: string) => void): void;
    getxattr?(path: string, name: string, position: number, cb: (err: number, value?: Buffer | null) => void): void;
    listxattr?(path: string, cb: (err: number, list?: string[]) => void): void;
  }

  export interface FuseOptions {
    force?: boolean;
    mkdir?: boolean;
    debug?: boolean;
    allowOther?: boolean;
    defaultPermissions?: boolean;
    fsname?: string;
    subtype?: string;
    kernelCache?: boolean;
    autoCache?: boolean;
    entryTimeout?: number;
    attrTimeout?: number;
    maxRead?: number;
    /** ms for every op, or per op name with a `default`; false disables. */
    timeout?: number | false | Record<string, number | false>;
  }

  class Fuse {
    constructor(mnt: string, ops: FuseOps, opts?: FuseOptions);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    /** Builds the `-o...` option string handed to libfuse. */
    _fuseOptions(): string;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static EPERM: number;
    static ENOENT: number;
    static EIO: number;
    static EACCES: number;
    static EINVAL: number;
    static ENOTDIR: number;
    static EISDIR: number;
    static EROFS: number;
    static ENODATA: number;
    static ENOTSUP: number;
    static ERANGE: number;
    static ETIMEDOUT: number;
  }
  export = Fuse;
}
