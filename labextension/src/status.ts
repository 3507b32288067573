/**
 * The status-bar item "crucible: N running, M queued", refreshed every few seconds while
 * the page is visible (GET queue); clicking it opens the history panel.
 */
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import { CrucibleAPI } from './api';
import { messageOf } from './model';

const REFRESH_MS = 3000;

/** The queue summary in the status bar. */
export class QueueStatusItem extends Widget {
  constructor(
    private readonly api: CrucibleAPI,
    onClick: () => void
  ) {
    super();
    this.addClass('jp-CrucibleQueueStatus');
    this.node.textContent = 'crucible: …';
    this.node.addEventListener('click', onClick);
    this._poll = new Poll({
      factory: () => this.refresh(),
      frequency: { interval: REFRESH_MS, backoff: true, max: 60 * 1000 },
      standby: 'when-hidden',
      name: 'crucible-jupyter:queue'
    });
  }

  /** Fetch the queue and show it. */
  async refresh(): Promise<void> {
    try {
      const queue = await this.api.queue();
      this.node.textContent = `crucible: ${queue.running} running, ${queue.queued} queued`;
      this.node.title =
        `Crucible: ${queue.running} of ${queue.capacity} sandboxes busy,` +
        ` ${queue.queued} waiting. Click for the execution history.`;
      this.removeClass('jp-mod-error');
    } catch (e) {
      this.node.textContent = 'crucible: unavailable';
      this.node.title = messageOf(e);
      this.addClass('jp-mod-error');
      throw e; // the poll backs off
    }
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  private _poll: Poll;
}
