import { stat } from 'node:fs/promises';

/** True when `file` exists (following symlinks); any error looking, such as ENOENT, counts as absent. */
export async function pathExists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch {
    return false;
  }
}
