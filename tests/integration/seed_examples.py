"""The usage examples of the seed document (seed/000_d4dc9efcb444e0fd.txt), as source text.

The sync blocks are copied from the seed unchanged except the import line
(`from together import Together` → `from batchd import Client as Together`);
the seed's copy lost its indentation, which is restored here. They are kept
as text, not as Python modules, because they are scripts sharing one
namespace (later blocks use `client`, `batch`, `json`, `completed_batch` from
earlier ones) and are not written for `mypy --strict`; the tests exec them in
order in one namespace, as a reader pasting them into one script would.

The async blocks are the same examples written for `AsyncClient`: the same
lines with `await` before each client call and `asyncio.sleep` for
`time.sleep`, nothing else.
"""

from __future__ import annotations

BASIC = """\
from batchd import Client as Together
import json

client = Together()

# Prepare batch requests file
batch_requests = [
    {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "meta-llama/Llama-3.2-3B-Instruct-Turbo",
            "messages": [{"role": "user", "content": "What is AI?"}],
            "max_tokens": 100
        }
    },
    {
        "custom_id": "request-2",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "meta-llama/Llama-3.2-3B-Instruct-Turbo",
            "messages": [{"role": "user", "content": "Explain machine learning"}],
            "max_tokens": 100
        }
    }
]

# Save batch requests to JSONL file
with open("batch_requests.jsonl", "w") as f:
    for request in batch_requests:
        f.write(json.dumps(request) + "\\n")

# Upload batch file
batch_file = client.files.upload(
    file="batch_requests.jsonl",
    purpose="batch-api"
)

# Create batch job
batch = client.batches.create_batch(
    file_id=batch_file.id,
    endpoint="/v1/chat/completions"
)

print(f"Batch job created: {batch.id}")
print(f"Status: {batch.status}")
"""

MONITOR = '''\
import time

def monitor_batch_job(client: Together, batch_id: str):
    """Monitor batch job until completion."""

    while True:
        batch = client.batches.get_batch(batch_id)
        print(f"Status: {batch.status}")

        if batch.status == "COMPLETED":
            print("Batch processing completed!")
            return batch
        elif batch.status == "FAILED":
            print("Batch processing failed!")
            return batch
        elif batch.status == "CANCELLED":
            print("Batch processing was cancelled!")
            return batch

        time.sleep(60)  # Check every minute

# Monitor the batch job
completed_batch = monitor_batch_job(client, batch.id)

if completed_batch.status == "COMPLETED":
    # Download results
    output_content = client.files.retrieve_content(
        id=completed_batch.output_file_id,
        output="batch_results.jsonl"
    )
    print("Results downloaded to batch_results.jsonl")
'''

LARGE = '''\
def create_large_batch_job(texts: list, model: str, prompt_template: str):
    """Create a batch job for processing many texts."""

    batch_requests = []

    for i, text in enumerate(texts):
        request = {
            "custom_id": f"text-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [
                    {"role": "user", "content": prompt_template.format(text=text)}
                ],
                "max_tokens": 200,
                "temperature": 0.3
            }
        }
        batch_requests.append(request)

    # Save to file
    filename = f"batch_texts_{len(texts)}.jsonl"
    with open(filename, "w") as f:
        for request in batch_requests:
            f.write(json.dumps(request) + "\\n")

    return filename

# Process 1000 documents
documents = [f"Document content {i}" for i in range(1000)]
prompt = "Summarize the following document in one sentence: {text}"

batch_file_path = create_large_batch_job(
    texts=documents,
    model="meta-llama/Llama-3.2-3B-Instruct-Turbo",
    prompt_template=prompt
)

# Upload and process
batch_file = client.files.upload(file=batch_file_path, purpose="batch-api")
batch_job = client.batches.create_batch(
    file_id=batch_file.id,
    endpoint="/v1/chat/completions"
)

print(f"Created batch job for {len(documents)} documents: {batch_job.id}")
'''

RESULTS = '''\
def process_batch_results(results_file: str):
    """Process and analyze batch job results."""

    results = []

    with open(results_file, "r") as f:
        for line in f:
            result = json.loads(line)
            results.append(result)

    # Analyze results
    successful = [r for r in results if r.get("response")]
    failed = [r for r in results if r.get("error")]

    print(f"Total results: {len(results)}")
    print(f"Successful: {len(successful)}")
    print(f"Failed: {len(failed)}")

    # Extract responses
    responses = []
    for result in successful:
        custom_id = result["custom_id"]
        content = result["response"]["body"]["choices"][0]["message"]["content"]
        responses.append({
            "id": custom_id,
            "response": content
        })

    return responses

# Process results after batch completion
if completed_batch.status == "COMPLETED":
    responses = process_batch_results("batch_results.jsonl")

    print("Sample responses:")
    for response in responses[:5]:
        print(f"{response['id']}: {response['response'][:100]}...")
'''

SYNC = {"basic": BASIC, "monitor": MONITOR, "large": LARGE, "results": RESULTS}

# -- the same examples for AsyncClient ----------------------------------------

ASYNC_BASIC = (
    BASIC.replace("from batchd import Client as Together", "from batchd import AsyncClient as AsyncTogether")
    .replace("client = Together()", "client = AsyncTogether()")
    .replace("batch_file = client.", "batch_file = await client.")
    .replace("batch = client.", "batch = await client.")
)

ASYNC_MONITOR = '''\
import asyncio

async def monitor_batch_job(client: AsyncTogether, batch_id: str):
    """Monitor batch job until completion."""

    while True:
        batch = await client.batches.get_batch(batch_id)
        print(f"Status: {batch.status}")

        if batch.status == "COMPLETED":
            print("Batch processing completed!")
            return batch
        elif batch.status == "FAILED":
            print("Batch processing failed!")
            return batch
        elif batch.status == "CANCELLED":
            print("Batch processing was cancelled!")
            return batch

        await asyncio.sleep(60)  # Check every minute

# Monitor the batch job
completed_batch = await monitor_batch_job(client, batch.id)

if completed_batch.status == "COMPLETED":
    # Download results
    output_content = await client.files.retrieve_content(
        id=completed_batch.output_file_id,
        output="batch_results.jsonl"
    )
    print("Results downloaded to batch_results.jsonl")
'''

ASYNC_LARGE = LARGE.replace("batch_file = client.", "batch_file = await client.").replace(
    "batch_job = client.", "batch_job = await client."
)

ASYNC = {"basic": ASYNC_BASIC, "monitor": ASYNC_MONITOR, "large": ASYNC_LARGE, "results": RESULTS}
