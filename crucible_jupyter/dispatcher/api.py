"""The in-process dispatcher API that the CLI, the server extension, the magic and the kernel use.

(Contract; implemented by ``crucible_jupyter.dispatcher.core.Dispatcher``.)

    dispatcher = Dispatcher(config=traitlets_config)      # a traitlets Configurable
    await dispatcher.start()                               # migrate storage, reconcile, start scheduler
    execution = await dispatcher.submit(request_dict, user="alice")   # validates, persists `queued`
    async for event in dispatcher.subscribe(execution.id, after=-1):  # Event objects (models.Event)
        ...                                                # ends after the terminal status event
    execution = await dispatcher.wait(execution.id)        # until terminal
    execution = await dispatcher.get(execution.id)         # NotFound if unknown
    execution = await dispatcher.cancel(execution.id)      # Conflict if already finished
    page, next_cursor = await dispatcher.list(user=None, status=None, tag=None,
                                              since=None, until=None, cursor=None, limit=50)
    events = await dispatcher.events(execution.id, after=-1)   # stored events
    stats = await dispatcher.stats(user=None, since=None)
    queue = dispatcher.queue_status(execution_id=None)     # depth per priority, running, capacity, position
    dispatcher.busy                                        # True while anything is queued or running
    await dispatcher.stop()                                # cancels running work, flushes storage
"""
