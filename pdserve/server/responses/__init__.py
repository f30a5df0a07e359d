"""OpenAI's Responses API (`/v1/responses`) for text models, over the chat path.

request.py       the body, validated; what is refused and why
conversation.py  a request (and a stored conversation) as the chat request it amounts to
items.py         input items as input_items lists them (each with an id), and the list object
output.py        output items assembled from a reply, with their stream events (events.py)
objects.py       the Response object and its items, in the `openai` package's shapes
run.py           engine outputs -> a response's events; settling its end (status, usage, store)
store.py         stored responses: a bounded LRU in memory (GET, input_items, previous_response_id)
background.py    background responses: running in a task, then stored; cancel, delete
event_log.py     a streamed background response's events, for its stream and GET ?stream=true
endpoint.py      POST /v1/responses
manage.py        GET, DELETE /v1/responses/{response_id}, POST .../cancel
input_items.py   GET /v1/responses/{response_id}/input_items
"""
