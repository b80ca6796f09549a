"""manager_core: picloud's data half, usable as a library on your own engine.

Everything takes a SQLAlchemy ``AsyncEngine`` (``postgresql+psycopg://``); every
repository method also takes ``conn=`` to join a transaction you own, so your
own writes, picloud's KV/document writes and the outbox rows they fan out
commit together::

    from sqlalchemy.ext.asyncio import create_async_engine
    from manager_core import tables
    from manager_core.outbox_event_emitter import OutboxEventEmitter
    from manager_core.postgres.kv import PostgresKvRepo
    from manager_core.postgres.outbox import OutboxSignal
    from manager_core.postgres.triggers import PostgresTriggerRepo

    engine = create_async_engine("postgresql+psycopg://…")
    async with engine.begin() as conn:            # the schema: or `picloud migrate`
        await conn.run_sync(tables.metadata.create_all)
    triggers = PostgresTriggerRepo(engine)
    kv = PostgresKvRepo(engine, OutboxEventEmitter(triggers, OutboxSignal()))
    async with engine.begin() as conn:
        await conn.execute(my_table.insert().values(...))
        await kv.set(app_id, "orders:42", {"total": 3}, conn=conn)   # fires triggers

The dispatcher (``manager_core.dispatcher``) and the admin API
(``manager_core.api.admin_routes``) are built the same way; ``picloud.services``
is the reference wiring.
"""
