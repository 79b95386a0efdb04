-- A small shop: customers carry PII (email, SSN, card number), orders reference them.
CREATE TABLE public.customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    ssn         text NOT NULL,
    card_number text NOT NULL,
    phone       text,
    notes       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.orders (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers(id),
    status      text NOT NULL DEFAULT 'new',
    total_cents integer NOT NULL CHECK (total_cents >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.audit_scratch (id serial PRIMARY KEY, payload text);

INSERT INTO public.customers (name, email, ssn, card_number, phone, notes) VALUES
  ('Ada Lovelace',    'ada@example.com',     '123-45-6789', '4111111111111111', '+1 415 555 0101', 'prefers email'),
  ('Grace Hopper',    'grace@example.org',   '234-56-7890', '5500005555555559', '+1 415 555 0102', 'call grace@example.org after 5pm'),
  ('Alan Turing',     'alan@example.net',    '345-67-8901', '340000000000009',  '+44 20 7946 0958', NULL),
  ('Katherine Johnson','kj@example.com',     '456-78-9012', '6011000000000004', NULL, 'VIP'),
  ('Edsger Dijkstra', 'edsger@example.nl',   '567-89-0123', '3530111333300000', NULL, NULL);

INSERT INTO public.orders (customer_id, status, total_cents)
SELECT 1 + (g % 5), CASE WHEN g % 3 = 0 THEN 'shipped' ELSE 'new' END, 100 * g
FROM generate_series(1, 20) AS g;

CREATE VIEW public.customer_contacts AS
  SELECT id, name, email, phone FROM public.customers;

-- Roles the rotated login roles inherit (DatabaseConnection.spec.credentials.grantRoles).
CREATE ROLE shop_reader NOLOGIN;
CREATE ROLE shop_writer NOLOGIN;
GRANT USAGE ON SCHEMA public TO shop_reader, shop_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO shop_reader;
GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO shop_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO shop_writer;
