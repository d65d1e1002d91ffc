"""The fair order of the job queue as SQL: which job is next, and where a job stands.

Needs the partial index `jobs_queued_per_user` (migration 3 in engine/queue.py).
"""

# Fair order of queued jobs: every user's first waiting job before anyone's second (round-robin), users served
# least recently first within a round, then priority, then age. A job's turn is 1 + the jobs of its user ahead of
# it (higher priority, or the same and older). Only what a question needs is computed, through index seeks, so the
# SQL of a claim or a position lookup takes about a millisecond with 10,000 jobs from 100 users waiting
# (bench/queue_load.py): the users with queued jobs are found by a skip scan of the partial index, one seek each.
# INDEXED BY pins the plans: without statistics SQLite may pick the status index and scan every queued job.
USERS_CTE = """
WITH RECURSIVE queued_users(user_key) AS (
    SELECT MIN(user_key) FROM jobs INDEXED BY jobs_queued_per_user WHERE status = 'queued'
    UNION ALL
    SELECT (SELECT MIN(j.user_key) FROM jobs j INDEXED BY jobs_queued_per_user
            WHERE j.status = 'queued' AND j.user_key > q.user_key)
    FROM queued_users q WHERE q.user_key IS NOT NULL
), users AS (
    SELECT q.user_key,
           COALESCE((SELECT MAX(r.started_at) FROM jobs r WHERE r.user_key = q.user_key), 0) AS last_served
    FROM queued_users q WHERE q.user_key IS NOT NULL
)
"""

# Of user `{j}`'s queued jobs, how many come before `{j}` (its turn - 1).
AHEAD_IN_TURN = """(
    (SELECT COUNT(*) FROM jobs a INDEXED BY jobs_queued_per_user
     WHERE a.status = 'queued' AND a.user_key = {j}.user_key AND a.priority > {j}.priority)
    + (SELECT COUNT(*) FROM jobs a INDEXED BY jobs_queued_per_user
       WHERE a.status = 'queued' AND a.user_key = {j}.user_key AND a.priority = {j}.priority AND a.id < {j}.id))"""

# The next job (always some user's first eligible job; jobs for excluded models, a json list, wait where they are
# and hold nobody's other jobs back), and beside it the first job for the warm model when that one may go first:
# the next job is for another model and has been passed over fewer than :max_skips times.
NEXT_SQL = (
    USERS_CTE
    + f"""
, head AS (
    SELECT j.id, j.model, j.passed_over FROM users u JOIN jobs j ON j.id = (
        SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user WHERE c.status = 'queued' AND c.user_key = u.user_key
            AND c.model NOT IN (SELECT value FROM json_each(:excluded))
        ORDER BY c.priority DESC, c.id LIMIT 1)
    ORDER BY j.priority DESC, u.last_served, j.id LIMIT 1
)
SELECT head.id, (
    SELECT j.id FROM users u JOIN jobs j ON j.id = (
        SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user WHERE c.status = 'queued' AND c.user_key = u.user_key
            AND c.model = :preferred
        ORDER BY c.priority DESC, c.id LIMIT 1)
    WHERE head.model != :preferred AND head.passed_over < :max_skips
    ORDER BY {AHEAD_IN_TURN.format(j="j")}, j.priority DESC, u.last_served, j.id LIMIT 1
) AS warm_id
FROM head
"""
)

# A job's position: its own turn, plus from every other user the jobs in earlier turns and their job in the same
# turn when that one sorts first.
POSITION_SQL = (
    USERS_CTE
    + f"""
, me AS (
    SELECT j.id, j.user_key, j.priority, {AHEAD_IN_TURN.format(j="j")} AS ahead,
           (SELECT last_served FROM users WHERE user_key = j.user_key) AS last_served
    FROM jobs j WHERE j.id = ? AND j.status = 'queued'
), others AS (
    SELECT u.last_served,
           (SELECT COUNT(*) FROM jobs c INDEXED BY jobs_queued_per_user
            WHERE c.status = 'queued' AND c.user_key = u.user_key) AS queued,
           (SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user
            WHERE c.status = 'queued' AND c.user_key = u.user_key
            ORDER BY c.priority DESC, c.id LIMIT 1 OFFSET (SELECT ahead FROM me)) AS same_turn
    FROM users u WHERE u.user_key != (SELECT user_key FROM me)
)
SELECT me.ahead + 1 + COALESCE((
    SELECT SUM(MIN(o.queued, me.ahead) + COALESCE(
        s.priority > me.priority OR (s.priority = me.priority AND (o.last_served < me.last_served
            OR (o.last_served = me.last_served AND s.id < me.id))), 0))
    FROM others o LEFT JOIN jobs s ON s.id = o.same_turn), 0) AS position
FROM me
"""
)
