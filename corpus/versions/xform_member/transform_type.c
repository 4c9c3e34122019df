/* One transformer for every value of struct account (v1 -> v2). */
#include "upstare_transformers.h"

int xf_account(const struct account__old *old, struct account *new)
{
    new->balance = old->deposits - old->withdrawals;
    return 0;
}
