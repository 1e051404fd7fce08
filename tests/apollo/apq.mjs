// Apollo Client 4 with its persisted-queries link against outrider (in front of the FastAPI
// example's strawberry /graphql). Prints one JSON object: every HTTP request each client made
// and the results, for tests/deploy_e2e.rs to check. Usage: node apq.mjs http://host:port/graphql
import { createHash } from "node:crypto";
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { PersistedQueryLink } from "@apollo/client/link/persisted-queries";

const uri = process.argv[2];
if (!uri) {
  console.error("usage: node apq.mjs <graphql url>");
  process.exit(2);
}

const sha256 = (text) => createHash("sha256").update(text).digest("hex");

/** A client whose every HTTP request is recorded as {method, hashOnly, status, codes}. */
function client(useGETForHashedQueries, log) {
  const recordingFetch = async (url, init) => {
    const response = await fetch(url, init);
    const sent = init.method === "GET"
      ? Object.fromEntries(new URL(String(url)).searchParams)
      : JSON.parse(init.body);
    const body = await response.clone().json().catch(() => null);
    log.push({
      method: init.method,
      hasQuery: typeof sent.query === "string",
      hasHash: String(sent.extensions ?? "").includes("sha256Hash") ||
        Boolean(sent.extensions?.persistedQuery?.sha256Hash),
      status: response.status,
      codes: (body?.errors ?? []).map((e) => e.extensions?.code ?? null),
      xCacheStatus: response.headers.get("x-cache-status"),
      cacheControl: response.headers.get("cache-control"),
    });
    return response;
  };
  const link = new PersistedQueryLink({ sha256, useGETForHashedQueries })
    .concat(new HttpLink({ uri, fetch: recordingFetch }));
  return new ApolloClient({ link, cache: new InMemoryCache() });
}

const ITEM = gql`
  query ConformanceItem($id: Int!) {
    item(id: $id) { id name }
  }
`;
const ITEMS = gql`
  query ConformanceItems($limit: Int!) {
    items(limit: $limit) { id }
  }
`;

async function run(name, useGET, query, variables) {
  const log = [];
  const result = await client(useGET, log).query({ query, variables, fetchPolicy: "network-only" });
  return { name, requests: log, data: result.data ?? null, error: result.error?.message ?? null };
}

const runs = [];
// A first client: NOT_FOUND, then the registration with the full query.
runs.push(await run("first", false, ITEM, { id: 1 }));
// Later clients send only the hash.
runs.push(await run("second", false, ITEM, { id: 1 }));
// useGETForHashedQueries: a known hash goes as one GET.
runs.push(await run("get-known", true, ITEM, { id: 2 }));
// An unknown hash over GET: NOT_FOUND, then a POST with the query.
runs.push(await run("get-new", true, ITEMS, { limit: 2 }));
// And the same query by GET again: one GET, and now a response-cache hit.
runs.push(await run("get-again", true, ITEMS, { limit: 2 }));
runs.push(await run("get-cached", true, ITEMS, { limit: 2 }));
console.log(JSON.stringify({ runs }));
