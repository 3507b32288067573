/**
 * The "Crucible" sidebar panel: the execution history, newest first, with a status filter,
 * rows that expand to their code and output, live status and a Cancel button on active
 * rows. All state lives in `HistoryModel`; this module only draws it.
 */
import { Notification } from '@jupyterlab/apputils';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import * as React from 'react';

import { CrucibleAPI, Execution, ExecutionEvent, isActive, Status } from './api';
import { ChangeFeed } from './feed';
import { HistoryModel } from './model';

const STATUSES: Status[] = [
  'queued',
  'starting',
  'running',
  'succeeded',
  'failed',
  'timed_out',
  'cancelled'
];

/** The sidebar widget; it refreshes the history only while it is shown. */
export class HistoryPanel extends ReactWidget {
  constructor(api: CrucibleAPI, feed: ChangeFeed) {
    super();
    this.model = new HistoryModel(api, feed);
    this.id = 'crucible-history';
    this.addClass('jp-CrucibleHistory');
  }

  readonly model: HistoryModel;

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>{() => <History model={this.model} />}</UseSignal>
    );
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.model.visible = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this.model.visible = false;
  }

  dispose(): void {
    this.model.dispose();
    super.dispose();
  }
}

function History({ model }: { model: HistoryModel }): JSX.Element {
  useTick(5000); // relative times and running durations move on
  return (
    <div className="jp-CrucibleHistory-body">
      <div className="jp-CrucibleHistory-header" data-live={String(model.live)}>
        <h2 className="jp-CrucibleHistory-title">Crucible executions</h2>
        <span
          className="jp-CrucibleHistory-live"
          title={
            model.live
              ? 'Live: new executions and status changes show as they happen'
              : 'Not connected to the live feed: refreshing every few seconds'
          }
        >
          {model.live ? '● live' : '○ polling'}
        </span>
        <select
          className="jp-CrucibleHistory-filter jp-mod-styled"
          aria-label="Show executions of status"
          value={model.filter}
          onChange={e => model.setFilter(e.target.value)}
        >
          <option value="">all statuses</option>
          {STATUSES.map(s => (
            <option key={s} value={s}>
              {s.replace('_', ' ')}
            </option>
          ))}
        </select>
      </div>
      {model.error && (
        <div className="jp-CrucibleHistory-error" role="alert">
          <span>{model.error}</span>
          <button
            className="jp-CrucibleHistory-dismiss"
            title="Dismiss"
            onClick={() => model.clearError()}
          >
            ×
          </button>
        </div>
      )}
      <ul className="jp-CrucibleHistory-list">
        {model.rows.map(row => (
          <Row key={row.id} row={row} model={model} />
        ))}
      </ul>
      {!model.loading && model.rows.length === 0 && (
        <p className="jp-CrucibleHistory-empty">
          No executions{model.filter ? ` with status ${model.filter}` : ''} yet.
        </p>
      )}
      {model.hasMore && (
        <button
          className="jp-CrucibleHistory-more jp-mod-styled"
          onClick={() => void model.loadMore()}
        >
          Load more
        </button>
      )}
    </div>
  );
}

function Row({ row, model }: { row: Execution; model: HistoryModel }): JSX.Element {
  const expanded = model.isExpanded(row.id);
  const [cancelling, setCancelling] = React.useState(false);
  const onCancel = async (e: React.MouseEvent) => {
    e.stopPropagation();
    setCancelling(true);
    const problem = await model.cancel(row.id);
    setCancelling(false);
    if (problem) {
      Notification.error(`Could not cancel ${title(row)}: ${problem}`, { autoClose: 8000 });
    }
  };
  return (
    <li
      className={'jp-CrucibleHistory-row' + (expanded ? ' jp-mod-expanded' : '')}
      data-execution-id={row.id}
      data-status={row.status}
    >
      <div
        className="jp-CrucibleHistory-summary"
        role="button"
        tabIndex={0}
        aria-expanded={expanded}
        onClick={() => model.toggle(row.id)}
        onKeyDown={e => (e.key === 'Enter' || e.key === ' ') && model.toggle(row.id)}
      >
        <div className="jp-CrucibleHistory-line">
          <span className={`jp-CrucibleHistory-badge jp-mod-${row.status}`}>
            {row.status.replace('_', ' ')}
          </span>
          <span className="jp-CrucibleHistory-name" title={row.code}>
            {title(row)}
          </span>
          {isActive(row.status) && (
            <button
              className="jp-CrucibleHistory-cancel"
              disabled={cancelling}
              onClick={e => void onCancel(e)}
            >
              {cancelling ? 'Cancelling…' : 'Cancel'}
            </button>
          )}
        </div>
        <div className="jp-CrucibleHistory-meta">
          <span title="user">{row.user}</span>
          {row.notebook?.path && <span title="notebook">{row.notebook.path}</span>}
          <span title="duration">{duration(row)}</span>
          <span title={new Date(row.created_at).toLocaleString()}>{ago(row.created_at)}</span>
        </div>
      </div>
      {expanded && <Details row={row} model={model} />}
    </li>
  );
}

function Details({ row, model }: { row: Execution; model: HistoryModel }): JSX.Element {
  const detail = model.detail(row.id);
  return (
    <div className="jp-CrucibleHistory-details">
      <div className="jp-CrucibleHistory-label">
        {row.id} · {row.priority} priority{row.tags.length ? ' · ' + row.tags.join(', ') : ''}
      </div>
      <pre className="jp-CrucibleHistory-code">{row.code}</pre>
      {detail?.error && <div className="jp-CrucibleHistory-error">{detail.error}</div>}
      {detail?.loading && !detail.events.length && (
        <div className="jp-CrucibleHistory-label">loading output…</div>
      )}
      <Output events={detail?.events ?? []} />
      {row.reason && <div className="jp-CrucibleHistory-reason">{row.reason}</div>}
    </div>
  );
}

/** A cell's output as Jupyter would show it: streams, errors, PNG images, plain text. */
function Output({ events }: { events: ExecutionEvent[] }): JSX.Element {
  const parts: JSX.Element[] = [];
  let stream: { name: string; text: string; seq: number } | null = null;
  const flush = () => {
    if (stream) {
      parts.push(
        <pre key={stream.seq} className={`jp-CrucibleHistory-stream jp-mod-${stream.name}`}>
          {stream.text}
        </pre>
      );
      stream = null;
    }
  };
  for (const event of events) {
    if (event.type === 'stream') {
      const name = event.name ?? 'stdout';
      if (stream && stream.name === name) {
        stream.text += event.text ?? '';
      } else {
        flush();
        stream = { name, text: event.text ?? '', seq: event.seq };
      }
      continue;
    }
    flush();
    if (event.type === 'error') {
      const lines = event.traceback?.length ? event.traceback : [`${event.ename}: ${event.evalue}`];
      parts.push(
        <pre key={event.seq} className="jp-CrucibleHistory-stream jp-mod-error">
          {stripAnsi(lines.join('\n'))}
        </pre>
      );
    } else if (event.type === 'display_data' || event.type === 'execute_result') {
      const data = event.data ?? {};
      if (typeof data['image/png'] === 'string') {
        parts.push(
          <img
            key={event.seq}
            className="jp-CrucibleHistory-image"
            alt={plainText(data['text/plain'] ?? 'image')}
            src={`data:image/png;base64,${data['image/png']}`}
          />
        );
      } else if (data['text/plain'] !== undefined) {
        parts.push(
          <pre key={event.seq} className="jp-CrucibleHistory-stream">
            {plainText(data['text/plain'])}
          </pre>
        );
      }
    }
  }
  flush();
  return <div className="jp-CrucibleHistory-output">{parts}</div>;
}

/** A MIME bundle's `text/plain` value as text (the server sends a string). */
function plainText(value: unknown): string {
  return String(value);
}

/** The execution's name, else its first non-empty code line. */
function title(row: Execution): string {
  if (row.name) {
    return row.name;
  }
  const line = row.code.split('\n').find(l => l.trim() && !l.startsWith('%%'));
  return line?.trim() || '(empty cell)';
}

function duration(row: Execution): string {
  if (row.duration_ms !== null && row.duration_ms !== undefined) {
    return seconds(row.duration_ms);
  }
  if (row.started_at && isActive(row.status)) {
    return seconds(Date.now() - row.started_at) + '…';
  }
  return '–';
}

function seconds(ms: number): string {
  const s = ms / 1000;
  if (s < 60) {
    return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  }
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function ago(ms: number): string {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 10) {
    return 'just now';
  }
  if (s < 60) {
    return `${s} s ago`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ago`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)} h ago`;
  }
  return `${Math.floor(s / 86400)} d ago`;
}

function stripAnsi(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/\u001b\[[0-9;]*[A-Za-z]/g, '');
}

/** Re-render every `ms` milliseconds. */
function useTick(ms: number): void {
  const [, setTick] = React.useState(0);
  React.useEffect(() => {
    const timer = window.setInterval(() => setTick(t => t + 1), ms);
    return () => window.clearInterval(timer);
  }, [ms]);
}
