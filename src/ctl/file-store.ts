import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { readFile, stat, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { isMap, isScalar, isSeq, parseDocument, type Document, type Pair, type YAMLMap } from 'yaml';
import { MODEL_FIELDS, fromDoc, toDoc, type Hash, type HashStore, type HashWrite, type Plan } from '../lookup/admin.js';
import { normalizeLogin } from '../lookup/model.js';
import type { ChangeEvent, ObjectKind } from '../lookup/source.js';

const SECTION: Record<ObjectKind, 'users' | 'stores' | 'slots'> = { user: 'users', store: 'stores', slot: 'slots' };
const LOCK_WAIT_MS = 10_000;
/** Kick entries kept in the routes file; older ones are dropped by the next kick. */
const KICKS_KEPT = 20;
/** A lock file older than this was left by a ctl that died; nobody holds a write this long. */
const LOCK_STALE_MS = 30_000;

/**
 * The embedded routes file (lookup.file). A transaction takes `<file>.lock` (O_EXCL), reads
 * and edits the YAML document, writes a temp file in the same directory, fsyncs it and
 * renames it over the file: the proxies, which watch the directory, see either the old or
 * the new file, and the new file is their event. Comments and layout of entries we do not
 * touch are kept (the yaml package edits the document in place); a rewritten entry loses
 * its trailing comment. A `.json` file is written back as JSON (no comments there).
 */
export class FileHashStore implements HashStore {
  readonly where: string;

  constructor(
    private readonly path: string,
    private readonly defaultDomain?: string,
  ) {
    this.where = `file ${path}`;
  }

  private normalId(kind: ObjectKind, id: string): string {
    return kind === 'user' ? normalizeLogin(id, this.defaultDomain) : id;
  }

  /** The file's document; a missing file is an empty one (the first write creates it). */
  private async load(): Promise<Document> {
    let text = '';
    try {
      text = await readFile(this.path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    const doc = parseDocument(text);
    if (doc.errors.length > 0) throw new Error(`${this.path} is not valid YAML: ${doc.errors[0]?.message ?? ''}`);
    if (doc.contents !== null && !isMap(doc.contents)) throw new Error(`${this.path}: top level must be a mapping`);
    return doc;
  }

  private section(doc: Document, kind: ObjectKind, create: boolean): YAMLMap | undefined {
    const s = doc.get(SECTION[kind]);
    if (isMap(s)) return s;
    if (s !== undefined && s !== null) throw new Error(`${this.path}: "${SECTION[kind]}" must be a mapping`);
    if (!create) return undefined;
    const node = doc.createNode({});
    if (doc.contents === null) doc.contents = doc.createNode({});
    doc.set(SECTION[kind], node);
    return node as YAMLMap;
  }

  /** Entries whose key means `id` (users: any spelling that normalises to it). */
  private pairs(map: YAMLMap | undefined, kind: ObjectKind, id: string): Pair[] {
    if (!map) return [];
    return (map.items as Pair[]).filter((p) => {
      const k = isScalar(p.key) ? p.key.value : p.key;
      return k !== null && k !== undefined && this.normalId(kind, String(k)) === id;
    });
  }

  private extract(doc: Document, o: ChangeEvent): Hash | undefined {
    const found = this.pairs(this.section(doc, o.kind, false), o.kind, o.id);
    const last = found[found.length - 1]; // as in the file source: a later duplicate wins
    if (!last) return undefined;
    const v = last.value as { toJSON?: () => unknown } | null;
    const h = fromDoc(v && typeof v.toJSON === 'function' ? v.toJSON() : v);
    return Object.keys(h).length > 0 ? h : undefined;
  }

  async read(objs: readonly ChangeEvent[]): Promise<(Hash | undefined)[]> {
    const doc = await this.load();
    return objs.map((o) => this.extract(doc, o));
  }

  async transact<T>(objs: readonly ChangeEvent[], plan: (current: (Hash | undefined)[]) => Plan<T>, opts: { dryRun?: boolean } = {}): Promise<T> {
    return this.locked(async () => {
      const doc = await this.load();
      const p = plan(objs.map((o) => this.extract(doc, o)));
      if (opts.dryRun || p.writes.length === 0) return p.result;
      for (const w of p.writes) this.apply(doc, w);
      this.writeAtomically(this.path.endsWith('.json') ? `${JSON.stringify(doc.toJS(), null, 2)}\n` : doc.toString({ lineWidth: 0 }));
      return p.result;
    });
  }

  private apply(doc: Document, w: HashWrite): void {
    const map = this.section(doc, w.kind, w.fields !== undefined);
    const found = this.pairs(map, w.kind, w.id);
    if (!w.fields) {
      if (map) map.items = (map.items as Pair[]).filter((p) => !found.includes(p));
      return;
    }
    // Keep the fields the contract does not own (a hand-written note, `location`), replace
    // the rest; spellings other than the normal form of a login are merged into one entry.
    const keep = this.extract(doc, w) ?? {};
    for (const f of MODEL_FIELDS[w.kind]) delete keep[f];
    const old = found[found.length - 1];
    const node = doc.createNode(toDoc({ ...keep, ...w.fields }));
    const oldValue = old?.value as YAMLMap | null | undefined;
    node.flow = oldValue && isMap(oldValue) ? oldValue.flow === true : true; // new entries: one line each
    // Comment lines above an entry usually describe a group and stay; the entry's trailing
    // comment described the old values ("# locked: ...") and goes with them.
    if (oldValue && isMap(oldValue)) node.commentBefore = oldValue.commentBefore;
    if (map && old && isScalar(old.key) && String(old.key.value) === w.id) {
      old.value = node;
      map.items = (map.items as Pair[]).filter((p) => p === old || !found.includes(p));
      return;
    }
    if (map) map.items = (map.items as Pair[]).filter((p) => !found.includes(p));
    map?.set(w.id, node);
  }

  /** temp file in the same directory, fsync, rename, fsync the directory. */
  private writeAtomically(text: string): void {
    const dir = dirname(this.path);
    const tmp = join(dir, `.${basename(this.path)}.ctl-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
    let mode = 0o644;
    try {
      mode = statSync(this.path).mode & 0o7777;
    } catch {
      /* new file */
    }
    const fd = openSync(tmp, 'wx', mode);
    try {
      writeSync(fd, text);
      fsyncSync(fd);
    } catch (e) {
      closeSync(fd);
      rmSync(tmp, { force: true });
      throw e;
    }
    closeSync(fd);
    try {
      renameSync(tmp, this.path);
    } catch (e) {
      rmSync(tmp, { force: true });
      throw e;
    }
    try {
      const dfd = openSync(dir, 'r');
      try {
        fsyncSync(dfd); // the rename itself survives a crash
      } finally {
        closeSync(dfd);
      }
    } catch {
      /* some filesystems refuse fsync on a directory; the rename is still atomic */
    }
  }

  /** Runs `fn` holding `<file>.lock`, so two ctl runs cannot lose each other's edits. */
  private async locked<T>(fn: () => Promise<T>): Promise<T> {
    const lock = `${this.path}.lock`;
    const deadline = Date.now() + LOCK_WAIT_MS;
    for (;;) {
      try {
        await writeFile(lock, `${process.pid}\n`, { flag: 'wx' });
        break;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        const age = await stat(lock).then((s) => Date.now() - s.mtimeMs, () => 0);
        if (age > LOCK_STALE_MS) {
          await unlink(lock).catch(() => undefined);
          continue;
        }
        if (Date.now() > deadline) throw new Error(`${lock} is held by another process (remove it if no ctl is running)`);
        await sleep(10 + Math.random() * 20);
      }
    }
    try {
      return await fn();
    } finally {
      await unlink(lock).catch(() => undefined);
    }
  }

  /**
   * Appends `{ <scope>: id, at: <now, ISO> }` to `kicks:`; the proxies watching the file end
   * the sessions it names that began before `at`. Only the last KICKS_KEPT entries are kept:
   * older ones have done their work.
   */
  async kick(scope: ObjectKind, id: string): Promise<undefined> {
    await this.locked(async () => {
      const doc = await this.load();
      if (doc.contents === null) doc.contents = doc.createNode({});
      let list = doc.get('kicks');
      if (list === undefined || list === null) {
        list = doc.createNode([]);
        doc.set('kicks', list);
      }
      if (!isSeq(list)) throw new Error(`${this.path}: "kicks" must be a list`);
      const entry = doc.createNode({ [scope]: id, at: new Date().toISOString() });
      entry.flow = true;
      list.items.push(entry);
      while (list.items.length > KICKS_KEPT) list.items.shift();
      this.writeAtomically(this.path.endsWith('.json') ? `${JSON.stringify(doc.toJS(), null, 2)}\n` : doc.toString({ lineWidth: 0 }));
    });
    return undefined;
  }

  async list(kind: ObjectKind): Promise<string[]> {
    const map = this.section(await this.load(), kind, false);
    const ids = new Set<string>();
    for (const p of (map?.items ?? []) as Pair[]) {
      const k = isScalar(p.key) ? p.key.value : p.key;
      if (k !== null && k !== undefined) ids.add(this.normalId(kind, String(k)));
    }
    return [...ids].sort();
  }

  async close(): Promise<void> {}
}
