/**
 * The status-bar item "crucible: N running, M queued" (GET queue), fetched again when the
 * change feed says an execution changed (or every few seconds without the feed) while the
 * page is visible; clicking it opens the history panel.
 */
import { Poll } from '@lumino/polling';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { CrucibleAPI } from './api';
import { ChangeFeed } from './feed';
import { messageOf, POLLING, WITH_FEED } from './model';

/** The queue summary in the status bar. */
export class QueueStatusItem extends Widget {
  constructor(
    private readonly api: CrucibleAPI,
    feed: ChangeFeed,
    onClick: () => void
  ) {
    super();
    this.addClass('jp-CrucibleQueueStatus');
    this.node.textContent = 'crucible: …';
    this.node.addEventListener('click', onClick);
    this._poll = new Poll({
      factory: () => this.refresh(),
      frequency: feed.connected ? WITH_FEED : POLLING,
      standby: 'when-hidden',
      name: 'crucible-jupyter:queue'
    });
    feed.changed.connect(() => void this._poll.refresh(), this);
    feed.connectionChanged.connect((_, connected) => {
      this._poll.frequency = connected ? WITH_FEED : POLLING;
    }, this);
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
    Signal.clearData(this);
    super.dispose();
  }

  private _poll: Poll;
}
