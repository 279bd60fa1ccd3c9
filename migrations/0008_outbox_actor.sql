-- The actor (`<region>.<incarnation>`) that wrote each outbox row. Its message id names that actor,
-- not the one in force when it is published: a row published but not yet deleted when the process
-- died, then published again after the region rotated its incarnation, keeps its message id, so
-- JetStream still drops the duplicate, and peers credit the outbox id to the incarnation that issued
-- it. Rows from before this column publish under the current actor, as they did.
ALTER TABLE outbox ADD COLUMN actor text;
