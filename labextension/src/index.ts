/**
 * The crucible-jupyter JupyterLab plugin: the "Crucible" history panel in the left
 * sidebar, and the queue in the status bar.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { CrucibleAPI } from './api';
import { ChangeFeed } from './feed';
import { HistoryPanel } from './panel';
import { QueueStatusItem } from './status';

import crucibleSvg from '../style/crucible.svg';

const SHOW_HISTORY = 'crucible:show-history';

/** The panel's icon: a crucible. */
export const crucibleIcon = new LabIcon({
  name: 'crucible-jupyter:crucible',
  svgstr: crucibleSvg
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'crucible-jupyter:plugin',
  description: 'Crucible execution history, live status and cancel; the queue in the status bar.',
  autoStart: true,
  optional: [ILayoutRestorer, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const api = new CrucibleAPI();
    const feed = new ChangeFeed(api); // one WebSocket for the panel and the status bar

    const panel = new HistoryPanel(api, feed);
    panel.title.icon = crucibleIcon;
    panel.title.caption = 'Crucible';
    app.shell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(SHOW_HISTORY, {
      label: 'Show Crucible Execution History',
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: SHOW_HISTORY, category: 'Crucible' });

    if (statusBar) {
      const item = new QueueStatusItem(api, feed, () => {
        void app.commands.execute(SHOW_HISTORY);
      });
      statusBar.registerStatusItem('crucible-jupyter:queue', {
        item,
        align: 'left',
        rank: 100
      });
    }
  }
};

export default plugin;
