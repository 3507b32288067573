/**
 * The server's change feed (WebSocket `crucible/api/changes`), shared by everything on the
 * page that shows executions: `changed` fires (at most once per short burst) when some
 * execution was submitted or changed status; `connectionChanged` says whether the feed is
 * connected. While it is not, views refresh on a timer instead. It reconnects by itself
 * until disposed.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { CrucibleAPI } from './api';

const RECONNECT_MS = 3000;
const DEBOUNCE_MS = 100; // changes that come together cause one refresh

/** A self-reconnecting subscription to the server's execution changes. */
export class ChangeFeed {
  constructor(private readonly api: CrucibleAPI) {
    this._connect();
  }

  /** Fires after a burst of execution changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Fires with the new state when the feed connects or is lost. */
  get connectionChanged(): ISignal<this, boolean> {
    return this._connectionChanged;
  }

  /** Whether the feed is connected now. */
  get connected(): boolean {
    return this._connected;
  }

  /** Close the feed for good. */
  dispose(): void {
    this._disposed = true;
    window.clearTimeout(this._retry);
    window.clearTimeout(this._debounce);
    const socket = this._socket;
    this._socket = null; // so that its close does not reconnect
    socket?.close();
    this._setConnected(false);
    Signal.clearData(this);
  }

  private _connect(): void {
    if (this._disposed) {
      return;
    }
    const socket = this.api.changes(
      () => this._onChange(),
      () => {
        if (this._socket === socket) {
          this._socket = null;
          this._setConnected(false);
          this._retry = window.setTimeout(() => this._connect(), RECONNECT_MS);
        }
      }
    );
    socket.onopen = () => this._setConnected(true);
    this._socket = socket;
  }

  private _onChange(): void {
    if (this._debounce === 0) {
      this._debounce = window.setTimeout(() => {
        this._debounce = 0;
        this._changed.emit();
      }, DEBOUNCE_MS);
    }
  }

  private _setConnected(value: boolean): void {
    if (value !== this._connected) {
      this._connected = value;
      this._connectionChanged.emit(value);
    }
  }

  private _changed = new Signal<this, void>(this);
  private _connectionChanged = new Signal<this, boolean>(this);
  private _socket: WebSocket | null = null;
  private _connected = false;
  private _disposed = false;
  private _retry = 0;
  private _debounce = 0;
}
