/**
 * The crucible REST + WebSocket API under `{base_url}crucible/api/`, as typed calls.
 *
 * Every request goes through `ServerConnection.makeRequest` with the page's settings, so
 * the token, the XSRF cookie and a JupyterHub base URL are handled as for Lab's own calls.
 * A failed call rejects with a `CrucibleAPIError` whose `message` is the server's
 * `{error, message}` text, written for the user.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * States of an execution, in the order they are reached. Python's spelling is
 * `crucible_jupyter/protocol.py` (STATUSES); tests/unit/test_protocol.py keeps the two equal.
 */
export type Status =
  'queued' | 'starting' | 'running' | 'succeeded' | 'failed' | 'timed_out' | 'cancelled';

/** The states after which nothing changes (protocol.py's TERMINAL_STATUSES, held equal by a test). */
export const TERMINAL: ReadonlySet<Status> = new Set([
  'succeeded',
  'failed',
  'timed_out',
  'cancelled'
]);

/** True while an execution can still change (and be cancelled). */
export function isActive(status: Status): boolean {
  return !TERMINAL.has(status);
}

/** One recorded execution, as `GET executions` lists it (times in ms since the epoch). */
export interface Execution {
  id: string;
  user: string;
  status: Status;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  duration_ms: number | null;
  exit_code: number | null;
  reason: string | null;
  code: string;
  name: string | null;
  tags: string[];
  priority: string;
  notebook: { path?: string | null; cell_id?: string | null } | null;
}

/** One numbered event: a status change or an output frame (Jupyter's MIME shapes). */
export interface ExecutionEvent {
  seq: number;
  t: number;
  type: string;
  status?: Status;
  reason?: string | null;
  name?: string;
  text?: string;
  data?: Record<string, unknown>;
  ename?: string;
  evalue?: string;
  traceback?: string[];
}

/**
 * A status change of some execution (sent once recorded), or `overflow` when this client
 * read too slowly and missed some.
 */
export interface ExecutionChange {
  id?: string;
  status?: Status;
  user?: string;
  overflow?: boolean;
}

/** A page of history, newest first; `next_cursor` fetches the next page. */
export interface ExecutionPage {
  executions: Execution[];
  next_cursor: string | null;
}

/** How busy the dispatcher is. */
export interface QueueStatus {
  queued: number;
  running: number;
  capacity: number;
  depth: Record<string, number>;
}

/** A refused or failed call: `message` is the server's explanation. */
export class CrucibleAPIError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly error: string = ''
  ) {
    super(message);
    this.name = 'CrucibleAPIError';
  }
}

/** Client of one server's crucible API. */
export class CrucibleAPI {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  /** A page of the history, newest first, optionally of one status. */
  listExecutions(
    options: { status?: string; cursor?: string | null; limit?: number } = {}
  ): Promise<ExecutionPage> {
    const query: Record<string, string> = { limit: String(options.limit ?? 25) };
    if (options.status) {
      query.status = options.status;
    }
    if (options.cursor) {
      query.cursor = options.cursor;
    }
    return this.request<ExecutionPage>('executions' + URLExt.objectToQueryString(query));
  }

  /** One execution with all of its stored events. */
  getExecution(id: string): Promise<Execution & { events: ExecutionEvent[] }> {
    return this.request(`executions/${encodeURIComponent(id)}`);
  }

  /** Cancel a queued or running execution; the execution as it is afterwards. */
  cancel(id: string): Promise<Execution> {
    return this.request(`executions/${encodeURIComponent(id)}/cancel`, {
      method: 'POST'
    });
  }

  /** Queue depth, running count and capacity. */
  queue(): Promise<QueueStatus> {
    return this.request('queue');
  }

  /**
   * Follow one execution's events after `after` (-1: from the start) until its terminal
   * status: `onEvent` for each, `onClose` once the socket is closed for any reason.
   */
  stream(
    id: string,
    after: number,
    onEvent: (event: ExecutionEvent) => void,
    onClose: () => void
  ): WebSocket {
    return this.socket(
      `executions/${encodeURIComponent(id)}/stream`,
      { after: String(after) },
      onEvent,
      onClose
    );
  }

  /**
   * Hear of every execution's status changes (queued, starting, running, its end) while
   * the server runs: `onChange` for each, `onClose` once the socket is closed.
   */
  changes(onChange: (change: ExecutionChange) => void, onClose: () => void): WebSocket {
    return this.socket('changes', {}, onChange, onClose);
  }

  /** A WebSocket under crucible/api whose JSON messages go to `onMessage`. */
  private socket<T>(
    path: string,
    query: Record<string, string>,
    onMessage: (message: T) => void,
    onClose: () => void
  ): WebSocket {
    let url = URLExt.join(this.settings.wsUrl, 'crucible/api', path);
    if (this.settings.appendToken && this.settings.token) {
      query = { ...query, token: this.settings.token };
    }
    url += URLExt.objectToQueryString(query);
    const socket = new this.settings.WebSocket(url);
    socket.onmessage = message => {
      let parsed: T;
      try {
        parsed = JSON.parse(message.data as string) as T;
      } catch (e) {
        console.warn(`crucible: ignored a message on ${path} that is not JSON`, e);
        return;
      }
      onMessage(parsed);
    };
    socket.onclose = () => onClose();
    return socket;
  }

  private async request<T>(path: string, init: RequestInit = {}): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, 'crucible/api', path);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (e) {
      throw new CrucibleAPIError(`the Jupyter server did not answer: ${String(e)}`, 0);
    }
    const body = parseJSON(await response.text());
    if (!response.ok) {
      const fields = (body ?? {}) as { error?: unknown; message?: unknown };
      const message =
        typeof fields.message === 'string'
          ? fields.message
          : `${response.status} ${response.statusText}`.trim();
      throw new CrucibleAPIError(
        message,
        response.status,
        typeof fields.error === 'string' ? fields.error : ''
      );
    }
    return body as T;
  }
}

/** The JSON value of a response body; null for an empty body or one that is not JSON. */
function parseJSON(text: string): unknown {
  if (!text) {
    return null;
  }
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
