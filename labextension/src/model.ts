/**
 * The history panel's state: the listed executions, which rows are expanded and their
 * events, and live updates for the executions that are still queued or running.
 *
 * While the panel is visible, the server's change feed (WebSocket `changes`) says when an
 * execution is submitted or changes status anywhere, and the first page is fetched again
 * then; without the feed (not connected yet, or lost) the page is refreshed every few
 * seconds instead. Each active execution is followed over its own WebSocket, so its
 * status and output change as they happen, and it is fetched again once it ends.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { CrucibleAPI, CrucibleAPIError, Execution, ExecutionEvent, isActive } from './api';
import { ChangeFeed } from './feed';

/** The events of one expanded (or followed) execution. */
export interface Detail {
  events: ExecutionEvent[];
  loading: boolean;
  error: string | null;
}

const PAGE_SIZE = 25;
const REFRESH_MS = 3000;
/** How often the first page is fetched without the change feed (backing off on errors)... */
export const POLLING = { interval: REFRESH_MS, backoff: true, max: 30 * 1000 };
/**
 * ...and with it: the feed tells of this server's executions at once; this catches those
 * of other processes on the same database (the `crucible` CLI, another dispatcher).
 */
export const WITH_FEED = { interval: 15 * 1000, backoff: true, max: 60 * 1000 };

/** State of the history panel; `changed` fires after every change. */
export class HistoryModel {
  constructor(
    readonly api: CrucibleAPI,
    readonly feed: ChangeFeed
  ) {
    this._poll = new Poll({
      factory: () => this.refresh(),
      frequency: feed.connected ? WITH_FEED : POLLING,
      standby: () => !this._visible || 'when-hidden',
      name: 'crucible-jupyter:history'
    });
    feed.changed.connect(this._onChange, this);
    feed.connectionChanged.connect(this._onConnection, this);
  }

  /** Fires whenever anything shown changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Listed executions, newest first. */
  get rows(): readonly Execution[] {
    return this._rows;
  }

  /** Whether older executions can be loaded. */
  get hasMore(): boolean {
    return this._nextCursor !== null;
  }

  /** The status shown ('' for all). */
  get filter(): string {
    return this._filter;
  }

  /** The last error to show the user, or null. */
  get error(): string | null {
    return this._error;
  }

  /** True until the first page arrived. */
  get loading(): boolean {
    return this._loading;
  }

  /** Tell the model whether the panel is on screen (it refreshes only then). */
  set visible(value: boolean) {
    this._visible = value;
    if (value) {
      void this._poll.refresh();
    }
  }

  /** Whether the change feed is connected (the history is then current within moments). */
  get live(): boolean {
    return this.feed.connected;
  }

  isExpanded(id: string): boolean {
    return this._expanded.has(id);
  }

  detail(id: string): Detail | undefined {
    return this._details.get(id);
  }

  /** Show only executions of `status` ('' for all) and start from the newest again. */
  setFilter(status: string): void {
    this._filter = status;
    this._rows = [];
    this._nextCursor = null;
    this._loading = true;
    this._emit();
    void this._poll.refresh();
  }

  /** Fetch the newest page and merge it with what is shown. */
  async refresh(): Promise<void> {
    const filter = this._filter;
    try {
      const page = await this.api.listExecutions({ status: filter, limit: PAGE_SIZE });
      if (filter !== this._filter) {
        return; // the filter changed while this page was on its way
      }
      const fresh = new Set(page.executions.map(e => e.id));
      const oldest = page.executions[page.executions.length - 1];
      const older = oldest
        ? this._rows.filter(r => !fresh.has(r.id) && r.created_at <= oldest.created_at)
        : [];
      if (this._rows.length <= PAGE_SIZE || !oldest) {
        this._nextCursor = page.next_cursor;
      }
      this._rows = [...page.executions.map(e => this._keepLive(e)), ...older];
      this._error = null;
    } catch (e) {
      this._error = messageOf(e);
      throw e; // the poll backs off
    } finally {
      this._loading = false;
      this._follow();
      this._emit();
    }
  }

  /** Append the next (older) page. */
  async loadMore(): Promise<void> {
    if (this._nextCursor === null) {
      return;
    }
    try {
      const page = await this.api.listExecutions({
        status: this._filter,
        cursor: this._nextCursor,
        limit: PAGE_SIZE
      });
      const shown = new Set(this._rows.map(r => r.id));
      this._rows = [...this._rows, ...page.executions.filter(e => !shown.has(e.id))];
      this._nextCursor = page.next_cursor;
      this._error = null;
    } catch (e) {
      this._error = messageOf(e);
    }
    this._follow();
    this._emit();
  }

  /** Expand or collapse a row; expanding fetches its events. */
  toggle(id: string): void {
    if (this._expanded.delete(id)) {
      this._emit();
      return;
    }
    this._expanded.add(id);
    if (!this._streams.has(id)) {
      void this._load(id);
    }
    this._emit();
  }

  /** Cancel a queued or running execution; a refusal is shown and returned. */
  async cancel(id: string): Promise<string | null> {
    try {
      const execution = await this.api.cancel(id);
      this._update(execution);
      this._error = null;
      return null;
    } catch (e) {
      this._error = messageOf(e);
      return this._error;
    } finally {
      this._emit();
    }
  }

  /** Dismiss the shown error. */
  clearError(): void {
    this._error = null;
    this._emit();
  }

  /** Stop polling and close every stream. */
  dispose(): void {
    this._poll.dispose();
    for (const socket of this._streams.values()) {
      socket.close();
    }
    this._streams.clear();
    Signal.clearData(this);
  }

  /** Some execution changed: fetch the first page again (when shown). */
  private _onChange(): void {
    if (this._visible) {
      void this._poll.refresh();
    }
  }

  /** The feed connected (then poll rarely, and catch up) or was lost (then poll often). */
  private _onConnection(_: ChangeFeed, connected: boolean): void {
    this._poll.frequency = connected ? WITH_FEED : POLLING;
    if (connected && this._visible) {
      void this._poll.refresh(); // what happened before the feed was there
    }
    this._emit();
  }

  /** A listed row, unless a live stream already knows a newer status for it. */
  private _keepLive(execution: Execution): Execution {
    const shown = this._rows.find(r => r.id === execution.id);
    if (shown && !isActive(shown.status) && isActive(execution.status)) {
      return shown;
    }
    return execution;
  }

  /** Open a stream for each active row that has none. */
  private _follow(): void {
    for (const row of this._rows) {
      if (isActive(row.status) && !this._streams.has(row.id)) {
        this._open(row.id);
      }
    }
  }

  private _open(id: string): void {
    const detail = this._detailOf(id);
    const after = detail.events.length ? detail.events[detail.events.length - 1].seq : -1;
    const socket = this.api.stream(
      id,
      after,
      event => this._onEvent(id, event),
      () => {
        this._streams.delete(id);
        void this._load(id); // the final record, with its duration and every event
      }
    );
    this._streams.set(id, socket);
  }

  private _onEvent(id: string, event: ExecutionEvent): void {
    const detail = this._detailOf(id);
    const last = detail.events[detail.events.length - 1];
    if (!last || event.seq > last.seq) {
      detail.events = [...detail.events, event];
    }
    if (event.type === 'status' && event.status) {
      const row = this._rows.find(r => r.id === id);
      if (row) {
        this._update({ ...row, status: event.status, reason: event.reason ?? row.reason });
      }
    }
    this._emit();
  }

  /** Fetch one execution with its events into its row and detail. */
  private async _load(id: string): Promise<void> {
    const detail = this._detailOf(id);
    detail.loading = true;
    this._emit();
    try {
      const { events, ...execution } = await this.api.getExecution(id);
      this._update(execution);
      this._details.set(id, { events, loading: false, error: null });
    } catch (e) {
      this._details.set(id, { ...detail, loading: false, error: messageOf(e) });
    }
    this._emit();
  }

  private _detailOf(id: string): Detail {
    let detail = this._details.get(id);
    if (!detail) {
      detail = { events: [], loading: false, error: null };
      this._details.set(id, detail);
    }
    return detail;
  }

  private _update(execution: Execution): void {
    this._rows = this._rows.map(r => (r.id === execution.id ? { ...r, ...execution } : r));
  }

  private _emit(): void {
    this._changed.emit();
  }

  private _changed = new Signal<this, void>(this);
  private _rows: Execution[] = [];
  private _nextCursor: string | null = null;
  private _filter = '';
  private _error: string | null = null;
  private _loading = true;
  private _visible = false;
  private _expanded = new Set<string>();
  private _details = new Map<string, Detail>();
  private _streams = new Map<string, WebSocket>();
  private _poll: Poll;
}

/** What to tell the user about a failure. */
export function messageOf(e: unknown): string {
  if (e instanceof CrucibleAPIError) {
    return e.message;
  }
  return e instanceof Error ? e.message : String(e);
}
